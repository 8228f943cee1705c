//! The waypoint's access log: one JSON line per request on stdout (where container runtimes
//! collect it).
//!
//! A line has the keys of every zmesh JSON log line (`timestamp`, `level`, `target`=`access`,
//! `message`) and names the two sides as the node's access log does (ztunnel's names:
//! `src.addr`, `src.workload`, `src.namespace`, `src.identity`, `dst.addr`, `dst.service`,
//! `dst.workload`, `dst.namespace`, `dst.identity`, `bytes_sent`, `bytes_recv`, `duration` as
//! `"12ms"`), then the request's own fields (method, path, status, flags, trace ids). A side
//! that is not known is left out, as in the node's log (docs/telemetry.md "Access log (waypoint)").
//!
//! `AccessLog::record` builds every line, an HTTP request's or a TCP flow's refused by policy.
//! The request path only serializes a line and queues it on the shared bounded writer
//! (`crate::accesslog`): a slow stdout never blocks a request; when the queue is full the line
//! is dropped and counted, never the request.

use serde::Serialize;

use super::flow::Downstream;
use crate::accesslog::LineWriter;
use crate::model::{Service, Workload};

/// One request, as logged.
#[derive(Serialize)]
pub struct Line<'a> {
    pub timestamp: String,
    pub level: &'static str,
    pub target: &'static str,
    pub message: &'static str,
    #[serde(rename = "src.addr")]
    pub src_addr: String,
    #[serde(rename = "src.workload", skip_serializing_if = "Option::is_none")]
    pub src_workload: Option<&'a str>,
    #[serde(rename = "src.namespace")]
    pub src_namespace: &'a str,
    #[serde(rename = "src.identity")]
    pub src_identity: &'a str,
    #[serde(rename = "dst.addr")]
    pub dst_addr: String,
    #[serde(rename = "dst.service", skip_serializing_if = "Option::is_none")]
    pub dst_service: Option<&'a str>,
    #[serde(rename = "dst.workload", skip_serializing_if = "Option::is_none")]
    pub dst_workload: Option<&'a str>,
    #[serde(rename = "dst.namespace", skip_serializing_if = "Option::is_none")]
    pub dst_namespace: Option<&'a str>,
    #[serde(rename = "dst.identity", skip_serializing_if = "Option::is_none")]
    pub dst_identity: Option<String>,
    pub method: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub response_code: u16,
    pub grpc_status: &'a str,
    pub response_flags: &'a str,
    pub detail: &'a str,
    /// Whole milliseconds with the unit, as ztunnel writes `duration`.
    pub duration: String,
    /// Request body bytes (towards the destination).
    pub bytes_sent: u64,
    /// Response body bytes (back to the client).
    pub bytes_recv: u64,
    pub retries: u32,
    pub trace_id: String,
    pub span_id: String,
}

/// The constant part of every waypoint access line.
pub const LEVEL: &str = "INFO";
pub const TARGET: &str = crate::accesslog::ACCESS_TARGET;
pub const MESSAGE: &str = "request complete";

/// The waypoint's access log: JSON lines on stdout through the shared bounded writer, or nothing
/// when `node.access_log` is `off` (the waypoint has one line format, so `text` and `json` both
/// give JSON).
pub struct AccessLog(Option<LineWriter>);

impl AccessLog {
    pub fn new(format: crate::config::AccessLogFormat) -> Self {
        AccessLog(match format {
            crate::config::AccessLogFormat::Off => None,
            crate::config::AccessLogFormat::Text | crate::config::AccessLogFormat::Json => {
                Some(LineWriter::spawn(
                    "zmesh-accesslog",
                    crate::accesslog::QUEUE,
                    std::io::stdout(),
                ))
            }
        })
    }

    /// Writes the line of one flow (`with_line`).
    pub(super) fn record(
        &self,
        down: &Downstream,
        src_workload: Option<&Workload>,
        e: &Exchange<'_>,
    ) {
        with_line(down, src_workload, e, |line| self.write(line));
    }

    pub fn write(&self, line: &Line<'_>) {
        let Some(writer) = &self.0 else {
            return;
        };
        let Ok(mut bytes) = serde_json::to_vec(line) else {
            return;
        };
        bytes.push(b'\n');
        writer.write_line(bytes);
    }

    /// Lines dropped because stdout did not keep up.
    pub fn dropped(&self) -> u64 {
        self.0.as_ref().map_or(0, LineWriter::dropped)
    }
}

/// What one flow's access line says beyond its two addresses and the caller: an HTTP request
/// once its response body ended, or a TCP flow refused by policy (`method`/`path` `-`,
/// status 0, flag `RBAC`).
pub(super) struct Exchange<'a> {
    pub service: Option<&'a Service>,
    /// The endpoint the flow was sent to, if it got that far.
    pub endpoint: Option<&'a Workload>,
    pub method: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub response_code: u16,
    pub grpc_status: &'a str,
    pub flags: &'a str,
    pub detail: &'a str,
    pub duration_ms: u64,
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub retries: u32,
    /// Trace and span id of this hop.
    pub trace: (u128, u64),
}

impl<'a> Exchange<'a> {
    /// A TCP flow refused by the target's policies before anything was dialed: no method or
    /// path, no status (the stream was reset), flag `RBAC`, a new trace.
    pub(super) fn tcp_denial(service: Option<&'a Service>, detail: &'a str) -> Exchange<'a> {
        Exchange {
            service,
            endpoint: None,
            method: "-",
            path: "-",
            protocol: "tcp",
            response_code: 0,
            grpc_status: "-",
            flags: "RBAC",
            detail,
            duration_ms: 0,
            bytes_sent: 0,
            bytes_recv: 0,
            retries: 0,
            trace: crate::hbone::connect::new_trace_ids(),
        }
    }
}

fn now_rfc3339() -> String {
    let t = time::OffsetDateTime::now_utc();
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The one place a waypoint access line is built: an HTTP request's (`request`) and a TCP
/// flow's refused by policy (`tcp`) alike. `src_workload` is the caller's workload, if the model
/// knows its address; the rest of the source side is the downstream's. `Line` borrows, so it is
/// handed to `f` rather than returned.
pub(super) fn with_line<R>(
    down: &Downstream,
    src_workload: Option<&Workload>,
    e: &Exchange<'_>,
    f: impl FnOnce(&Line<'_>) -> R,
) -> R {
    let src_identity = down.client.to_string();
    f(&Line {
        timestamp: now_rfc3339(),
        level: LEVEL,
        target: TARGET,
        message: MESSAGE,
        src_addr: down.peer.to_string(),
        src_workload: src_workload.map(|w| w.name.as_str()),
        src_namespace: &down.client.namespace,
        src_identity: &src_identity,
        dst_addr: down.dst.to_string(),
        dst_service: e.service.map(|s| s.hostname.as_str()),
        dst_workload: e.endpoint.map(|w| w.name.as_str()),
        dst_namespace: e.endpoint.map(|w| w.namespace.as_str()),
        dst_identity: e.endpoint.map(|w| w.identity.to_string()),
        method: e.method,
        path: e.path,
        protocol: e.protocol,
        response_code: e.response_code,
        grpc_status: e.grpc_status,
        response_flags: e.flags,
        detail: e.detail,
        duration: format!("{}ms", e.duration_ms),
        bytes_sent: e.bytes_sent,
        bytes_recv: e.bytes_recv,
        retries: e.retries,
        trace_id: format!("{:032x}", e.trace.0),
        span_id: format!("{:016x}", e.trace.1),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::hbone::server::StreamGuard;
    use crate::identity::SpiffeId;
    use crate::model::Model;

    fn model() -> Model {
        let cfg = crate::config::Config::parse(
            r#"node: { name: n, certificates: { file_ca: { dir: /tmp/ca } } }
workloads:
  - { uid: c, name: client, namespace: shop, addresses: [10.0.0.1], node: n }
  - { uid: v1, name: v1, namespace: shop, addresses: [10.0.1.1], node: n, services: { shop/a.shop.svc.cluster.local: {} } }
services:
  - { name: a, namespace: shop, hostname: a.shop.svc.cluster.local, vips: [10.96.0.1], ports: { 80: 8080 } }
"#,
            "t",
        )
        .unwrap();
        Model::from_config(&cfg)
    }

    fn down() -> Downstream {
        Downstream {
            client: SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/client").unwrap(),
            peer: "10.0.0.1:40000".parse().unwrap(),
            guard: StreamGuard::single(),
            dst: "10.96.0.1:80".parse().unwrap(),
        }
    }

    /// The line as it is written: one JSON object, parsed back.
    fn written(down: &Downstream, src: Option<&Workload>, e: &Exchange<'_>) -> Value {
        let bytes = with_line(down, src, e, |l| serde_json::to_vec(l).unwrap());
        assert!(!bytes.contains(&b'\n'), "a line must stay one line");
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn an_http_request_line_names_both_sides_and_the_exchange() {
        let m = model();
        let (src, ep) = (m.workload_by_uid("c"), m.workload_by_uid("v1"));
        let svc = m.service_by_host("a.shop.svc.cluster.local");
        let e = Exchange {
            service: svc.map(|s| &**s),
            endpoint: ep.map(|w| &**w),
            method: "GET",
            path: "/x",
            protocol: "http",
            response_code: 200,
            grpc_status: "-",
            flags: "-",
            detail: "",
            duration_ms: 12,
            bytes_sent: 3,
            bytes_recv: 5,
            retries: 1,
            trace: (0xabc, 0x12),
        };
        let mut v = written(&down(), src.map(|w| &**w), &e);
        assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
        v.as_object_mut().unwrap().remove("timestamp");
        assert_eq!(
            v,
            json!({
                "level": LEVEL, "target": TARGET, "message": MESSAGE,
                "src.addr": "10.0.0.1:40000", "src.workload": "client", "src.namespace": "shop",
                "src.identity": "spiffe://cluster.local/ns/shop/sa/client",
                "dst.addr": "10.96.0.1:80", "dst.service": "a.shop.svc.cluster.local",
                "dst.workload": "v1", "dst.namespace": "shop",
                "dst.identity": ep.unwrap().identity.to_string(),
                "method": "GET", "path": "/x", "protocol": "http", "response_code": 200,
                "grpc_status": "-", "response_flags": "-", "detail": "", "duration": "12ms",
                "bytes_sent": 3, "bytes_recv": 5, "retries": 1,
                "trace_id": "00000000000000000000000000000abc", "span_id": "0000000000000012",
            })
        );
    }

    #[test]
    fn a_refused_tcp_flow_leaves_out_the_sides_it_never_reached() {
        let m = model();
        let svc = m.service_by_host("a.shop.svc.cluster.local");
        // A caller the model does not know by address, and no endpoint: those keys are absent.
        let v = written(
            &down(),
            None,
            &Exchange::tcp_denial(svc.map(|s| &**s), "denied as TCP by p"),
        );
        for absent in [
            "src.workload",
            "dst.workload",
            "dst.namespace",
            "dst.identity",
        ] {
            assert!(v.get(absent).is_none(), "{absent} in {v}");
        }
        assert_eq!(v["src.namespace"], "shop");
        assert_eq!(v["dst.service"], "a.shop.svc.cluster.local");
        assert_eq!(v["protocol"], "tcp");
        assert_eq!(v["response_code"], 0);
        assert_eq!(v["response_flags"], "RBAC");
        assert_eq!(v["duration"], "0ms");
        assert_eq!(v["detail"], "denied as TCP by p");
        let hex = |k: &str, len: usize| {
            let t = v[k].as_str().unwrap();
            t.len() == len && t.chars().all(|c| c.is_ascii_hexdigit())
        };
        assert!(hex("trace_id", 32) && hex("span_id", 16), "{v}");
    }

    #[test]
    fn hostile_detail_text_is_escaped_and_cannot_forge_a_second_line() {
        let forged = "x\"}\n{\"level\":\"INFO\",\"response_flags\":\"-\"";
        let v = written(&down(), None, &Exchange::tcp_denial(None, forged));
        assert_eq!(v["detail"], forged);
        assert_eq!(v["response_flags"], "RBAC");
        assert!(v.get("dst.service").is_none());
    }
}
