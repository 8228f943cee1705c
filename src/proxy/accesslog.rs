//! One structured access-log line per connection, with ztunnel's field names and formats so log
//! pipelines built for ztunnel read it (docs/telemetry.md "Access log (node)"): target `access`, message
//! `connection complete`, level `info` (or `error` when it failed, with an `error` field), and
//! `src.addr`, `src.workload`, `src.namespace`, `src.identity`, `dst.addr`, `dst.hbone_addr`,
//! `dst.service`, `dst.workload`, `dst.namespace`, `dst.identity`, `direction`, `bytes_sent`,
//! `bytes_recv` and `duration` (`"12ms"`). A field whose value is not known is left out, as
//! ztunnel does; so are the identities of a connection that is not mTLS. `bytes_sent` is what
//! the client sent towards the destination, `bytes_recv` what came back, in both directions. zmesh adds `path` (how the bytes left this node) and `result`
//! (`ok`/`reset`/`error`).
//!
//! The subscriber set up in `main` renders it as text or JSON and hands it to
//! `crate::accesslog::NodeLogWriter`, which queues it for the writer thread: `emit` never waits
//! for stderr, and a line that does not fit the queue is dropped and counted
//! (`zmesh_access_log_dropped_total`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::copy::Transfer;
use crate::metrics::{flags, NodeMetrics, TcpLabels};
use crate::model::{Service, Workload};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
    InboundPlaintext,
}

impl Direction {
    /// ztunnel's two values: plaintext inbound is `inbound` too (its `path` says `plaintext`).
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound | Direction::InboundPlaintext => "inbound",
        }
    }
}

/// The facts of one connection, filled in as they become known.
#[derive(Debug)]
pub struct ConnLog {
    pub direction: Direction,
    pub start: Instant,
    /// The client's address.
    pub src: SocketAddr,
    /// Where the bytes went at L4: the original destination, or for an HBONE connection the
    /// tunnel's address (peer `:15008` outbound, the one the tunnel arrived at inbound).
    pub dst: SocketAddr,
    /// The target inside the HBONE tunnel (the CONNECT authority), for HBONE connections.
    pub hbone_addr: Option<SocketAddr>,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_service: Option<String>,
    /// How traffic left this node: "hbone 10.0.0.2:15008", "direct", "passthrough", "app".
    pub path: String,
    pub transfer: Transfer,
    /// For the metrics' labels: the workloads and service, as far as they are known.
    pub src_wl: Option<Arc<Workload>>,
    pub dst_wl: Option<Arc<Workload>>,
    pub svc: Option<Arc<Service>>,
    /// Whether the far side is reached over mTLS (HBONE).
    pub mtls: bool,
    /// Refused by an authorization policy (`response_flags="DENY"`).
    pub denied: bool,
    metrics: Arc<NodeMetrics>,
    /// Set once the connection reached its far side: it is then counted as opened.
    opened_as: Option<Arc<TcpLabels>>,
    /// Told when the far side is reached, or that it never will be (see [`OnOpen`]).
    pub on_open: Option<OnOpen>,
}

/// Called once per connection, from the outbound path itself: `Ok` when the tunnel (or relay)
/// is up and before any byte is relayed, `Err` with the reason when the connection ends without
/// ever getting there. A SOCKS5 client (`connect`) gets its reply from it: success only once
/// the HBONE tunnel really is up (RFC 1928 section 6).
#[derive(Clone)]
pub struct OnOpen(pub Arc<OnOpenFn>);

/// What an [`OnOpen`] calls: `Ok` once up, `Err(reason)` when it never will be.
pub type OnOpenFn = dyn Fn(Result<(), &dyn std::fmt::Display>) + Send + Sync;

impl std::fmt::Debug for OnOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnOpen")
    }
}

impl ConnLog {
    pub fn new(
        direction: Direction,
        src: SocketAddr,
        dst: SocketAddr,
        metrics: &Arc<NodeMetrics>,
    ) -> Self {
        ConnLog {
            src_wl: None,
            dst_wl: None,
            svc: None,
            mtls: false,
            denied: false,
            metrics: metrics.clone(),
            opened_as: None,
            on_open: None,
            direction,
            start: Instant::now(),
            src,
            dst,
            hbone_addr: None,
            src_identity: None,
            dst_identity: None,
            dst_workload: None,
            dst_service: None,
            path: String::new(),
            transfer: Transfer::default(),
        }
    }

    /// The destination workload and, when the connection was for one, its service: the log's
    /// `dst.workload` and `dst.service`, and the metrics' destination labels.
    pub fn set_destination(&mut self, workload: &Arc<Workload>, service: Option<&Arc<Service>>) {
        self.dst_workload = Some(workload.name.clone());
        self.dst_service = service.map(|s| s.hostname.clone());
        self.dst_wl = Some(workload.clone());
        self.svc = service.cloned();
    }

    fn labels(&self) -> TcpLabels {
        let reporter = match self.direction {
            Direction::Outbound => "source",
            Direction::Inbound | Direction::InboundPlaintext => "destination",
        };
        TcpLabels::new(
            reporter,
            self.src_wl.as_deref(),
            self.src_identity.as_deref(),
            self.dst_wl.as_deref(),
            self.svc.as_deref(),
            self.mtls,
        )
    }

    /// The connection reached its far side (tunnel up, or app dialed): count it as opened.
    pub fn opened(&mut self) {
        self.opened_as = Some(self.metrics.opened(self.labels()));
        if let Some(on_open) = self.on_open.take() {
            (on_open.0)(Ok(()));
        }
    }

    /// Request bytes (client towards the destination) and response bytes (back), whichever
    /// socket the relay counted from.
    fn request_response(&self) -> (u64, u64) {
        // `transfer` counts from the side the relay was given first: the client socket for
        // outbound and plaintext inbound, the app socket for HBONE inbound.
        match self.direction {
            Direction::Outbound | Direction::InboundPlaintext => {
                (self.transfer.sent, self.transfer.received)
            }
            Direction::Inbound => (self.transfer.received, self.transfer.sent),
        }
    }

    /// Emits the line (when access logging is on) and settles the metrics: an opened connection
    /// is closed with its bytes, any other one failed. `error` is None for a completed one.
    pub fn emit(&self, enabled: bool, error: Option<&dyn std::fmt::Display>) {
        let (request, response) = self.request_response();
        if let (None, Some(on_open)) = (&self.opened_as, &self.on_open) {
            let closed: &dyn std::fmt::Display = &"closed before the far side was reached";
            (on_open.0)(Err(error.unwrap_or(closed)));
        }
        match &self.opened_as {
            // Istio's meaning: "sent" is response bytes (towards the client), "received"
            // request bytes.
            Some(l) => self.metrics.closed(l, response, request),
            None => {
                let flag = if self.denied {
                    flags::DENY
                } else {
                    flags::CONNECT
                };
                self.metrics.failed(self.labels().with_flags(flag))
            }
        }
        if !enabled {
            return;
        }
        let result = match (error, self.transfer.reset) {
            (Some(_), _) => "error",
            (None, true) => "reset",
            (None, false) => "ok",
        };
        // ztunnel: the source workload's namespace and the destination's, from the model.
        let src_ns = self.src_wl.as_deref().map(|w| w.namespace.as_str());
        let src_workload = self.src_wl.as_deref().map(|w| w.name.as_str());
        let dst_ns = self.dst_wl.as_deref().map(|w| w.namespace.as_str());
        let duration = format!("{}ms", self.start.elapsed().as_millis());
        macro_rules! access_line {
            ($level:expr, $($error:tt)*) => {
                tracing::event!(
                    target: crate::accesslog::ACCESS_TARGET,
                    $level,
                    src.addr = %self.src,
                    src.workload = src_workload,
                    src.namespace = src_ns,
                    src.identity = self.src_identity.as_deref().filter(|_| self.mtls),
                    dst.addr = %self.dst,
                    dst.hbone_addr = self.hbone_addr.map(tracing::field::display),
                    dst.service = self.dst_service.as_deref(),
                    dst.workload = self.dst_workload.as_deref(),
                    dst.namespace = dst_ns,
                    dst.identity = self.dst_identity.as_deref().filter(|_| self.mtls),
                    direction = self.direction.as_str(),
                    bytes_sent = request,
                    bytes_recv = response,
                    duration = %duration,
                    path = %self.path,
                    result,
                    $($error)*
                    "connection complete"
                )
            };
        }
        match error {
            None => access_line!(tracing::Level::INFO,),
            Some(e) => access_line!(tracing::Level::ERROR, error = %e,),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accesslog::tests::{returns_promptly, StalledSink};
    use crate::accesslog::{LineWriter, NodeLogWriter};

    /// Issue #11 finding 10: the node's connection log with its output stalled (stderr a pipe
    /// nobody reads). `emit` still returns at once for every connection: the first line sits
    /// in the stuck write, 16 wait in the queue, the other 483 are dropped and counted.
    #[test]
    fn emit_never_waits_for_a_stalled_log_output() {
        let sink = StalledSink::default();
        let lines: &'static LineWriter = Box::leak(Box::new(LineWriter::spawn(
            "test-node-log",
            16,
            sink.clone(),
        )));
        let subscriber = Arc::new(
            tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_writer(NodeLogWriter::to(lines))
                .finish(),
        );
        let metrics = Arc::new(NodeMetrics::default());
        let src: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let first = ConnLog::new(Direction::Outbound, src, dst, &metrics);
        tracing::subscriber::with_default(subscriber.clone(), || first.emit(true, None));
        sink.wait_stuck();
        returns_promptly(move || {
            tracing::subscriber::with_default(subscriber, || {
                for _ in 0..499 {
                    ConnLog::new(Direction::Outbound, src, dst, &metrics).emit(true, None);
                }
            });
        });
        assert_eq!(lines.dropped(), 499 - 16);
        sink.release();
        assert!(lines.close(std::time::Duration::from_secs(10)));
        assert_eq!(sink.lines(), 17);
        let written = String::from_utf8(sink.written.lock().unwrap().clone()).unwrap();
        assert!(
            written.contains("\"dst.addr\":\"10.0.0.2:8080\""),
            "{written}"
        );
    }

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The JSON lines `f` logs through the binaries' shared JSON layer.
    fn json_lines(f: impl FnOnce()) -> Vec<serde_json::Value> {
        use tracing_subscriber::layer::SubscriberExt;
        use zmesh_redirect::logging::{fmt_layer, LogFormat};
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::registry().with(fmt_layer(
            LogFormat::Json,
            move || out.clone(),
            false,
        ));
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    fn model() -> crate::model::Model {
        let cfg = crate::config::Config::parse(
            r#"
node:
  name: node-a
  certificates: { file_ca: { dir: /tmp/ca } }
workloads:
  - { uid: c, name: client, namespace: shop, service_account: front, addresses: [10.0.0.1], node: node-a }
  - { uid: s, name: server-7d9, namespace: store, service_account: back, addresses: [10.0.0.2], node: node-b,
      services: { "store/server.store.svc.cluster.local": { 8080: 8080 } } }
services:
  - { name: server, namespace: store, hostname: server.store.svc.cluster.local, vips: [10.96.0.1], ports: { 8080: 8080 } }
"#,
            "test",
        )
        .unwrap();
        crate::model::Model::from_config(&cfg)
    }

    /// Issue #13: a completed HBONE connection logs ztunnel's fields with ztunnel's formats
    /// (`duration` as "Nms", `bytes_recv`, dotted src/dst names), under target `access`, with
    /// the shared JSON keys; the bytes read from the client's side in both directions.
    #[test]
    fn a_completed_connection_logs_ztunnels_fields() {
        let model = model();
        let metrics = Arc::new(NodeMetrics::default());
        let client = model.workload_by_ip("10.0.0.1".parse().unwrap()).cloned();
        let server = model
            .workload_by_ip("10.0.0.2".parse().unwrap())
            .cloned()
            .unwrap();
        let svc = model.service_by_vip("10.96.0.1".parse().unwrap()).cloned();
        let mut log = ConnLog::new(
            Direction::Outbound,
            "10.0.0.1:40000".parse().unwrap(),
            "10.96.0.1:8080".parse().unwrap(),
            &metrics,
        );
        log.src_identity = Some(client.as_ref().unwrap().identity.to_string());
        log.src_wl = client;
        log.dst = "10.0.0.2:15008".parse().unwrap();
        log.hbone_addr = Some("10.0.0.2:8080".parse().unwrap());
        log.dst_identity = Some(server.identity.to_string());
        log.set_destination(&server, svc.as_ref());
        log.mtls = true;
        log.path = "hbone 10.0.0.2:15008 authority 10.0.0.2:8080".into();
        log.opened();
        log.transfer.sent = 1000;
        log.transfer.received = 2345;
        let lines = json_lines(|| log.emit(true, None));
        assert_eq!(lines.len(), 1, "{lines:?}");
        let l = &lines[0];
        let want = [
            ("target", "access"),
            ("level", "INFO"),
            ("message", "connection complete"),
            ("src.addr", "10.0.0.1:40000"),
            ("src.workload", "client"),
            ("src.namespace", "shop"),
            ("src.identity", "spiffe://cluster.local/ns/shop/sa/front"),
            ("dst.addr", "10.0.0.2:15008"),
            ("dst.hbone_addr", "10.0.0.2:8080"),
            ("dst.service", "server.store.svc.cluster.local"),
            ("dst.workload", "server-7d9"),
            ("dst.namespace", "store"),
            ("dst.identity", "spiffe://cluster.local/ns/store/sa/back"),
            ("direction", "outbound"),
            ("result", "ok"),
        ];
        for (k, v) in want {
            assert_eq!(l[k], v, "{k}: {l}");
        }
        assert_eq!(l["bytes_sent"], 1000, "{l}");
        assert_eq!(l["bytes_recv"], 2345, "{l}");
        let duration = l["duration"].as_str().unwrap();
        assert!(
            duration.strip_suffix("ms").unwrap().parse::<u64>().is_ok(),
            "{duration}"
        );
        assert!(
            l.get("timestamp").is_some() && l.get("error").is_none(),
            "{l}"
        );
        for old in ["bytes_received", "duration_ms"] {
            assert!(l.get(old).is_none(), "{old}: {l}");
        }

        // Inbound, the relay counts from the app's socket: the log still reads from the
        // client's side.
        let mut inbound = ConnLog::new(
            Direction::Inbound,
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:15008".parse().unwrap(),
            &metrics,
        );
        inbound.transfer.sent = 2345;
        inbound.transfer.received = 1000;
        let l = &json_lines(|| inbound.emit(true, None))[0];
        assert_eq!(
            (&l["bytes_sent"], &l["bytes_recv"]),
            (&1000.into(), &2345.into())
        );
        assert_eq!(l["direction"], "inbound");
    }

    /// A failed plaintext connection: level ERROR with the `error` field, `direction` inbound
    /// (ztunnel has no third value), and what is not known, or not proven by mTLS, is left out
    /// rather than written as a placeholder. A policy denial counts as failed with DENY.
    #[test]
    fn a_failed_connection_logs_its_error_and_leaves_out_what_is_unknown() {
        let model = model();
        let metrics = Arc::new(NodeMetrics::default());
        let mut log = ConnLog::new(
            Direction::InboundPlaintext,
            "192.0.2.9:5555".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap(),
            &metrics,
        );
        let server = model
            .workload_by_ip("10.0.0.2".parse().unwrap())
            .cloned()
            .unwrap();
        log.dst_identity = Some(server.identity.to_string());
        log.dst_workload = Some(server.name.clone());
        log.dst_wl = Some(server);
        log.denied = true;
        let lines = json_lines(|| log.emit(true, Some(&"denied by policy \"strict\" (reset)")));
        let l = &lines[0];
        assert_eq!(l["level"], "ERROR", "{l}");
        assert_eq!(l["error"], "denied by policy \"strict\" (reset)", "{l}");
        assert_eq!(l["direction"], "inbound", "{l}");
        assert_eq!(l["dst.workload"], "server-7d9", "{l}");
        assert_eq!(l["dst.namespace"], "store", "{l}");
        for absent in [
            "src.workload",
            "src.namespace",
            "src.identity",
            "dst.identity",
            "dst.hbone_addr",
            "dst.service",
        ] {
            assert!(l.get(absent).is_none(), "{absent}: {l}");
        }
        let text = metrics.encode(&[]);
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_tcp_connections_failed_total{")
                    && l.contains("response_flags=\"DENY\"")
                    && l.contains("connection_security_policy=\"unknown\"")
                    && l.ends_with(" 1")),
            "{text}"
        );
    }
    /// `on_open` hears once: `Ok` when the far side is reached (never again at the close), or
    /// the failure's reason when the connection ends before that.
    #[test]
    fn on_open_hears_once_whether_the_far_side_was_reached() {
        let metrics = Arc::new(NodeMetrics::default());
        let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
        let hook = {
            let heard = heard.clone();
            OnOpen(Arc::new(move |r: Result<(), &dyn std::fmt::Display>| {
                heard.lock().unwrap().push(r.map_err(|e| e.to_string()));
            }))
        };
        let new = || {
            let mut log = ConnLog::new(
                Direction::Outbound,
                "127.0.0.1:5000".parse().unwrap(),
                "10.96.0.1:80".parse().unwrap(),
                &metrics,
            );
            log.on_open = Some(hook.clone());
            log
        };
        let mut up = new();
        up.opened();
        up.emit(false, None);
        assert_eq!(*heard.lock().unwrap(), vec![Ok(())]);
        heard.lock().unwrap().clear();
        new().emit(false, Some(&"tunnel refused"));
        assert_eq!(
            *heard.lock().unwrap(),
            vec![Err("tunnel refused".to_string())]
        );
    }
}
