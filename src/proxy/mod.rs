//! The node's listeners and the state they share.
//!
//! `Node` is built once from the config: the certificate manager, the HBONE pool, the
//! per-identity TLS server configs and the live `State` (model and policies). `start` binds the
//! listeners (15001 outbound, 15006 plaintext inbound, 15008 HBONE inbound, 15021 readiness) and
//! returns a handle that stops them.
//!
//! The state is published through a watch channel: a reload swaps it in one step, and every
//! inbound connection waits on the same channel, re-judges itself against the new policies and
//! closes if it is now denied (`enforce`). That is why a policy change reaches every open
//! connection in every scope, selector policies included, without a registry of connections.

mod accesslog;
pub mod admin;
pub mod connect;
mod gateway;
mod inbound;
pub mod inpod;
pub mod operator;
pub mod outbound;
mod passthrough;
mod plaintext;
mod readiness;
pub mod reload;
pub mod socks5;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use accesslog::{ConnLog, Direction, OnOpen};

use crate::config::{AccessLogFormat, CertificatesConfig, Config, InboundPlaintext, Mode};
use crate::hbone::client::Pool;
use crate::identity::{
    load_certs_pem, load_crls, load_key_pem, CertManager, CertSource, Clock, FileCa, SpiffeId,
    StaticCert, SystemClock, Trust, WorkloadCert,
};
use crate::model::{Model, Workload};
use crate::netns::PodNetns;
use crate::policy::{self, Decision, PolicySet};
use crate::socket::{listen, TUNNEL_MARK};
use crate::tls;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("certificates: {0}")]
    Certs(String),
    #[error("cannot listen on {addr} ({role}): {source}")]
    Listen {
        role: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("node.east_west_gateway.control_plane {0} is this host's own passthrough port: it would pass through to itself")]
    PassthroughLoop(SocketAddr),
    #[error(
        "node.dns.upstreams is empty and {origin} names the loopback resolver {addr}: {}",
        crate::config::dns::LOOPBACK_IN_POD
    )]
    DnsLoopbackUpstream { addr: SocketAddr, origin: String },
}

/// In-pod mode forwards from inside each pod, where the node's loopback resolver does not
/// exist: refuses to start rather than SERVFAIL every name the mesh does not know.
pub(crate) fn check_in_pod_dns(d: &crate::config::dns::DnsConfig) -> Result<(), StartError> {
    if !d.enabled {
        return Ok(());
    }
    let (servers, origin) = dns_upstreams(d);
    match crate::config::dns::loopback_upstream(&servers) {
        Some(addr) => Err(StartError::DnsLoopbackUpstream { addr, origin }),
        None => Ok(()),
    }
}

/// Whether `target` is this host's own control-plane passthrough: the port, on an address of
/// one of its interfaces (the config check at load cannot see those).
fn passthrough_loops(target: SocketAddr) -> bool {
    target.port() == crate::config::networks::CONTROL_PLANE_PORT
        && nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
            addrs.any(|i| {
                i.address.is_some_and(|a| {
                    a.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())) == Some(target.ip())
                        || a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())) == Some(target.ip())
                })
            })
        })
}

/// What a reload replaces, published as one value so readers never see a model from one
/// config and policies from another.
pub struct State {
    pub model: Arc<Model>,
    pub policies: Arc<PolicySet>,
}

impl State {
    fn from_config(cfg: &Config) -> State {
        for w in cfg.warnings() {
            tracing::warn!("config: {w}");
        }
        let policies = cfg.policy_set();
        for e in policies.errors() {
            tracing::error!(error = %e, "authorization policy refused; denying every connection in its scope until it is fixed");
        }
        State {
            model: Arc::new(Model::from_config(cfg)),
            policies: Arc::new(policies),
        }
    }
}

/// Counters the node keeps (exported as metrics by the admin server).
#[derive(Debug, Default)]
pub struct Stats {
    pub policy_allowed: AtomicU64,
    pub policy_denied: AtomicU64,
    /// Open connections closed because a new policy denies them.
    pub policy_closed: AtomicU64,
    /// Live connections cut because their peer's certificate chain is no longer trusted.
    pub revoked_closed: AtomicU64,
    pub reloads_applied: AtomicU64,
    pub reloads_rejected: AtomicU64,
    /// Open connections of a pod closed because its workload left the model (in-pod).
    pub unbound_closed: Arc<AtomicU64>,
}

/// Everything the listeners share.
pub struct Node {
    /// The config the node started with. Node settings are fixed for the life of the process;
    /// workloads, services, policies and certificate files follow reloads (see `reload`).
    pub cfg: Config,
    state: watch::Sender<Arc<State>>,
    pub certs: Arc<CertManager>,
    pub pool: Arc<Pool>,
    pub stats: Stats,
    /// What the listeners refused, by reason, and the limiter for their warnings.
    pub rejections: crate::rejections::Rejections,
    pub metrics: Arc<crate::metrics::NodeMetrics>,
    /// Notified by the admin server's `/quitquitquit`: the binary then drains and exits.
    pub quit: tokio::sync::Notify,
    /// Pods proxied in in-pod mode (from the ZDS loop), for metrics.
    pub zds_pods: AtomicUsize,
    /// The pod proxies as the admin dump shows them (in-pod mode).
    pub pods: Mutex<Vec<PodView>>,
    /// Runtime log-level control for the admin server, installed by the binary.
    pub log_control: std::sync::OnceLock<Arc<dyn admin::LogControl>>,
    /// The xDS client, when workloads come from a control plane (`node.control_plane`).
    pub xds: std::sync::OnceLock<Arc<crate::xds::XdsClient>>,
    mark: Option<u32>,
    server_configs: Mutex<HashMap<SpiffeId, ServerConfigEntry>>,
    ready: AtomicBool,
    /// Proxied connections in flight, across every scope: what a drain waits for.
    active: Arc<AtomicUsize>,
    /// Kill switches of scopes that stopped accepting but whose connections may finish (drain).
    draining: Mutex<Vec<watch::Sender<bool>>>,
    /// The data-plane runtime the node was built on, for its task count in the metrics (they
    /// are served from the control runtime, whose own handle would say nothing of the data path).
    runtime: tokio::runtime::Handle,
}

/// One pod proxy, for the admin dump.
pub struct PodView {
    pub uid: String,
    /// The model's workload for the pod, as it is now; None while the pod fails closed.
    pub workload: watch::Receiver<Option<Arc<Workload>>>,
    /// The identity its ZDS workload info claims (what certificates were first fetched for).
    pub zds_identity: Option<SpiffeId>,
    /// The pod namespace's identity (device, inode).
    pub netns_id: (u64, u64),
    pub pool: Arc<Pool>,
}

/// A cached TLS server config, valid for one certificate serial and one trust snapshot.
struct ServerConfigEntry {
    serial: String,
    trust_generation: u64,
    config: Arc<ServerConfig>,
}

/// Reads the certificate source and trust snapshot a config describes.
pub fn load_certificates(
    cfg: &Config,
    clock: Arc<dyn Clock>,
) -> Result<(CertSource, Trust), StartError> {
    load_certificates_marked(cfg, clock, Some(TUNNEL_MARK))
}

/// `load_certificates` whose CA client (`ca_client`) marks its sockets with `mark`: None for
/// `connect`, which has no capture rules to escape and no CAP_NET_ADMIN to set a mark with.
pub(crate) fn load_certificates_marked(
    cfg: &Config,
    clock: Arc<dyn Clock>,
    mark: Option<u32>,
) -> Result<(CertSource, Trust), StartError> {
    let certs_err = |e: &dyn std::fmt::Display| StartError::Certs(e.to_string());
    let (source, roots) = match &cfg.node.certificates {
        CertificatesConfig::FileCa { dir, ttl } => {
            let ca = FileCa::load(dir).map_err(|e| {
                // A fresh machine has no CA yet: say how to make one (dev only), or what to
                // use instead.
                let hint = if dir.join(crate::identity::CA_CERT_FILE).exists() {
                    String::new()
                } else {
                    format!(
                        " (no CA in {}: create a dev CA with `zmesh-node ca init --dir {}`, or use certificates.ca_client)",
                        dir.display(),
                        dir.display()
                    )
                };
                StartError::Certs(format!("{e}{hint}"))
            })?;
            let roots = ca.roots().to_vec();
            (CertSource::file_ca(ca, *ttl), roots)
        }
        CertificatesConfig::Static { roots, identities } => {
            let roots = load_certs_pem(roots).map_err(|e| certs_err(&e))?;
            let mut certs = Vec::new();
            for i in identities {
                certs.push(StaticCert {
                    chain: load_certs_pem(&i.cert).map_err(|e| certs_err(&e))?,
                    key: load_key_pem(&i.key).map_err(|e| certs_err(&e))?,
                });
            }
            (CertSource::Static(certs), roots)
        }
        CertificatesConfig::CaClient {
            target,
            ttl,
            impersonate,
        } => {
            let roots = load_certs_pem(&target.root_cert).map_err(|e| certs_err(&e))?;
            let ca = crate::identity::caclient::CaClient::new(target.clone(), mark, *impersonate);
            (
                CertSource::Ca {
                    ca: Arc::new(ca),
                    ttl: *ttl,
                },
                roots,
            )
        }
        CertificatesConfig::CaClientUnresolved(_) => {
            return Err(StartError::Certs(
                "node.certificates.ca_client was not resolved (Config::parse does it)".into(),
            ))
        }
    };
    let crls = match &cfg.node.crl {
        Some(path) => load_crls(path).map_err(|e| certs_err(&e))?,
        None => Vec::new(),
    };
    let trust = Trust::new(&roots, crls, tls::provider(), clock).map_err(|e| certs_err(&e))?;
    Ok((source, trust))
}

impl Node {
    /// Builds the node's state: loads the CA or static certificates and issues the certificates of
    /// every local workload up front, so the first connection pays no issuance latency.
    pub fn new(cfg: Config) -> Result<Arc<Node>, StartError> {
        let (source, trust) = load_certificates(&cfg, Arc::new(SystemClock))?;
        let certs =
            CertManager::with_trust(source, trust).map_err(|e| StartError::Certs(e.to_string()))?;
        Node::with_certs(cfg, Arc::new(certs))
    }

    /// `new` with a certificate manager built by the caller (tests inject a stepped clock or a
    /// failing CA this way).
    pub fn with_certs(cfg: Config, certs: Arc<CertManager>) -> Result<Arc<Node>, StartError> {
        // Host mode marks every socket it makes, so the capture rules never loop our own traffic.
        Node::build(cfg, certs, Some(TUNNEL_MARK))
    }

    /// A node for `zmesh-node connect` (client-only access): no capture rules to escape, so its
    /// sockets carry no mark and it needs no CAP_NET_ADMIN (it runs as an ordinary user).
    pub fn new_unprivileged(cfg: Config) -> Result<Arc<Node>, StartError> {
        let (source, trust) = load_certificates_marked(&cfg, Arc::new(SystemClock), None)?;
        let certs =
            CertManager::with_trust(source, trust).map_err(|e| StartError::Certs(e.to_string()))?;
        Node::build(cfg, Arc::new(certs), None)
    }

    fn build(
        cfg: Config,
        certs: Arc<CertManager>,
        mark: Option<u32>,
    ) -> Result<Arc<Node>, StartError> {
        let state = State::from_config(&cfg);
        for w in state.model.local_workloads() {
            certs
                .fetch(&w.identity)
                .map_err(|e| StartError::Certs(e.to_string()))?;
        }
        let pool = Pool::new(
            certs.clone(),
            mark,
            None,
            cfg.node.connect_timeout,
            cfg.node.keepalive(),
        );
        Ok(Arc::new(Node {
            cfg,
            state: watch::Sender::new(Arc::new(state)),
            certs,
            pool,
            stats: Stats::default(),
            rejections: Default::default(),
            metrics: Arc::default(),
            quit: tokio::sync::Notify::new(),
            log_control: std::sync::OnceLock::new(),
            xds: std::sync::OnceLock::new(),
            zds_pods: AtomicUsize::new(0),
            pods: Mutex::new(Vec::new()),
            mark,
            server_configs: Mutex::new(HashMap::new()),
            ready: AtomicBool::new(false),
            active: Arc::new(AtomicUsize::new(0)),
            draining: Mutex::new(Vec::new()),
            // The pool above already spawned its reaper here: this is the node's runtime.
            runtime: tokio::runtime::Handle::current(),
        }))
    }

    /// The Prometheus text of every node metric: the TCP families with Istio's labels, then the
    /// counters and gauges the node keeps itself.
    pub fn metrics_text(&self) -> String {
        use crate::metrics::count;
        let s = &self.stats;
        let now = self.certs.now();
        let certs = self
            .certs
            .cached()
            .iter()
            .map(|c| {
                let left = c
                    .not_after
                    .duration_since(now)
                    .map_or(0.0, |d| d.as_secs_f64());
                (
                    format!("{{identity=\"{}\",serial=\"{}\"}}", c.identity, c.serial),
                    left,
                )
            })
            .collect();
        let mut extra = vec![
            (
                "zmesh_policy_decisions_total",
                "counter",
                "L4 authorization decisions at this node",
                vec![
                    ("{decision=\"allow\"}".into(), count(&s.policy_allowed)),
                    ("{decision=\"deny\"}".into(), count(&s.policy_denied)),
                ],
            ),
            (
                "zmesh_policy_closed_connections_total",
                "counter",
                "Open connections closed because a new policy denies them",
                vec![(String::new(), count(&s.policy_closed))],
            ),
            (
                "zmesh_pod_unbound_connections_closed_total",
                "counter",
                "Open connections of a pod closed because its workload was removed from the model (in-pod; the pod then fails closed)",
                vec![(String::new(), count(&s.unbound_closed))],
            ),
            (
                "zmesh_revoked_connections_closed_total",
                "counter",
                "Live connections cut because the peer's chain became revoked",
                vec![(String::new(), count(&s.revoked_closed))],
            ),
            (
                "zmesh_config_reloads_total",
                "counter",
                "Config reloads by outcome",
                vec![
                    ("{result=\"applied\"}".into(), count(&s.reloads_applied)),
                    ("{result=\"rejected\"}".into(), count(&s.reloads_rejected)),
                ],
            ),
            (
                "zmesh_rejected_total",
                "counter",
                "Connections and streams refused by a listener, by reason (handshakes, bad CONNECTs, self-targets, rapid resets)",
                self.rejections.series(),
            ),
            (
                "zmesh_log_lines_suppressed_total",
                "counter",
                "Rejection warnings not logged because of the rate limit (they are still counted)",
                vec![(String::new(), self.rejections.suppressed_total() as f64)],
            ),
            (
                "zmesh_access_log_dropped_total",
                "counter",
                "Access-log lines dropped because the log output did not keep up",
                vec![(String::new(), crate::accesslog::node_dropped() as f64)],
            ),
            (
                "zmesh_certificate_expiry_seconds",
                "gauge",
                "Seconds until each workload certificate expires",
                certs,
            ),
            (
                "zmesh_hbone_pool_connections",
                "gauge",
                "Pooled outbound HBONE connections (host scope)",
                vec![(String::new(), self.pool.connections() as f64)],
            ),
            (
                "zmesh_active_connections",
                "gauge",
                "Connections being proxied",
                vec![(String::new(), self.active_connections() as f64)],
            ),
            (
                "zmesh_zds_pods",
                "gauge",
                "Pods this node proxies in in-pod mode (enrolled over ZDS)",
                vec![(String::new(), self.zds_pods.load(Ordering::Relaxed) as f64)],
            ),
            (
                "zmesh_zds_snapshot_received",
                "gauge",
                "1 once the redirect agent's first snapshot is in (in-pod mode)",
                vec![(
                    String::new(),
                    f64::from(u8::from(
                        self.cfg.node.mode == Mode::InPod && self.ready.load(Ordering::Acquire),
                    )),
                )],
            ),
            (
                "process_cpu_seconds_total",
                "counter",
                "CPU time of this process, user and system",
                vec![(String::new(), crate::metrics::process_cpu_seconds())],
            ),
            (
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory of this process",
                vec![(String::new(), crate::metrics::process_rss_bytes())],
            ),
            (
                "process_open_fds",
                "gauge",
                "Open file descriptors of this process",
                vec![(String::new(), crate::metrics::process_open_fds())],
            ),
            (
                "zmesh_tokio_alive_tasks",
                "gauge",
                "Tasks alive on the node's tokio runtimes (spawned and not yet finished), by runtime: a leak shows as a count that does not come back down",
                vec![
                    (
                        "{runtime=\"data_plane\"}".into(),
                        self.runtime.metrics().num_alive_tasks() as f64,
                    ),
                    (
                        "{runtime=\"control\"}".into(),
                        control().metrics().num_alive_tasks() as f64,
                    ),
                ],
            ),
            (
                "zmesh_build_info",
                "gauge",
                "The running build",
                vec![(
                    format!(
                        "{{version=\"{}\",git_sha=\"{}\"}}",
                        zmesh_redirect::VERSION_NUMBER,
                        zmesh_redirect::GIT_SHA
                    ),
                    1.0,
                )],
            ),
        ];
        if let Some(x) = self.xds.get() {
            extra.extend(x.metrics());
        }
        self.metrics.encode(&extra)
    }

    /// The current model and policies.
    pub fn state(&self) -> Arc<State> {
        self.state.borrow().clone()
    }

    /// Changes to the state (reloads), for connections that must re-judge themselves.
    pub fn subscribe_state(&self) -> watch::Receiver<Arc<State>> {
        self.state.subscribe()
    }

    /// Judges an inbound connection against the current policies, counting the decision and
    /// logging what dry-run policies would have done.
    pub fn authorize(&self, conn: &policy::Connection) -> Decision {
        let d = self.state().policies.evaluate(conn);
        let counter = if d.allowed {
            &self.stats.policy_allowed
        } else {
            &self.stats.policy_denied
        };
        counter.fetch_add(1, Ordering::Relaxed);
        for (policy, would_allow) in &d.dry_run_results {
            tracing::info!(
                policy = %policy,
                src = %conn.src_ip,
                dst = %format_args!("{}:{}", conn.dst_ip, conn.dst_port),
                identity = conn.src_identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                verdict = if *would_allow { "allow" } else { "deny" },
                "dry-run policy"
            );
        }
        d
    }

    pub fn model(&self) -> Arc<Model> {
        self.state().model.clone()
    }

    pub fn mark(&self) -> Option<u32> {
        self.mark
    }

    /// Connections currently being proxied.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// The host-mode scope: the node's own namespace and pool, workloads found by address.
    pub fn host_scope(&self, kill: watch::Receiver<bool>) -> Arc<Scope> {
        Arc::new(Scope {
            netns: None,
            pool: self.pool.clone(),
            serves: Serves::ByAddress,
            kill,
            active: self.active.clone(),
        })
    }

    /// Keeps a stopped scope's connections alive until the process exits (drain).
    fn keep_draining(&self, kill: watch::Sender<bool>) {
        self.draining
            .lock()
            .expect("drain lock poisoned")
            .push(kill);
    }

    pub fn is_ready(&self) -> bool {
        self.pending().is_empty()
    }

    /// What readiness still waits for; empty when the node is ready.
    pub fn pending(&self) -> Vec<String> {
        let mut pending = Vec::new();
        if !self.ready.load(Ordering::Acquire) {
            pending.push(match self.cfg.node.mode {
                Mode::InPod => "the first ZDS snapshot from the redirect agent".to_string(),
                Mode::Host => "listeners".to_string(),
            });
        }
        if let Some(cp) = &self.cfg.node.control_plane {
            if !self.xds.get().is_some_and(|x| x.synced()) {
                pending.push(format!(
                    "the first xDS response of each type (Address, Authorization) from {}",
                    cp.target.address
                ));
            }
        }
        // Certificates are needed only where workloads run here (host mode); in-pod nodes fetch
        // them as pods arrive.
        if self.cfg.node.mode == Mode::Host {
            let now = self.certs.now();
            let valid: std::collections::HashSet<SpiffeId> = self
                .certs
                .cached()
                .iter()
                .filter(|c| !c.is_expired(now))
                .map(|c| c.identity.clone())
                .collect();
            for w in self.model().local_workloads() {
                if !valid.contains(&w.identity) {
                    pending.push(format!("a valid certificate for {}", w.identity));
                }
            }
        }
        pending
    }

    /// Whether `dst`, an address of a local workload, names one of the node's own listeners.
    /// Dialing it would make the node connect to itself (docs/reliability.md #38).
    pub fn is_own_listener(&self, dst: SocketAddr) -> bool {
        self.cfg.node.ports.all().contains(&dst.port())
    }

    pub fn access_log_enabled(&self) -> bool {
        self.cfg.node.access_log != AccessLogFormat::Off
    }

    pub fn inbound_plaintext_allowed(&self) -> bool {
        self.cfg.node.inbound_plaintext == InboundPlaintext::Allow
    }

    /// The local workload a connection from `ip` belongs to. A host with a single workload owns
    /// every local address, so connections from its other interfaces still have an identity.
    pub fn source_workload(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        let model = self.model();
        if let Some(w) = model.local_workload(ip) {
            return Some(w.clone());
        }
        let mut local = model.local_workloads();
        match (local.next(), local.next()) {
            (Some(only), None) => Some(only.clone()),
            _ => None,
        }
    }

    /// TLS server config presenting `cert`, cached per identity and certificate serial.
    pub fn server_config(
        &self,
        cert: &WorkloadCert,
    ) -> Result<Arc<ServerConfig>, tls::TlsConfigError> {
        let mut cache = self
            .server_configs
            .lock()
            .expect("server config cache poisoned");
        let trust = self.certs.trust();
        if let Some(e) = cache.get(&cert.identity) {
            if e.serial == cert.serial && e.trust_generation == trust.generation {
                return Ok(e.config.clone());
            }
        }
        let config = Arc::new(tls::server_config(cert, &trust)?);
        cache.insert(
            cert.identity.clone(),
            ServerConfigEntry {
                serial: cert.serial.clone(),
                trust_generation: trust.generation,
                config: config.clone(),
            },
        );
        Ok(config)
    }
}

/// The end every terminated CONNECT shares (inbound to the app, the east-west gateway to an
/// endpoint's node), once `up` is dialed: answer 200, relay the stream and `up` while policy
/// still allows it (`who` is re-judged on every policy change), tell the connection's guard how
/// the tunnel ended, and log it.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn answer_and_relay(
    node: &Node,
    guard: &crate::hbone::server::StreamGuard,
    respond: h2::server::SendResponse<bytes::Bytes>,
    body: h2::RecvStream,
    up: &mut tokio::net::TcpStream,
    mut log: ConnLog,
    who: impl Fn() -> policy::Connection,
    changes: watch::Receiver<Arc<State>>,
    client: &SpiffeId,
) {
    let enabled = node.access_log_enabled();
    let send = match crate::hbone::server::respond_ok(respond) {
        Ok(s) => s,
        Err(e) => {
            guard.tunnel_ended(0, true);
            log.emit(
                enabled,
                Some(&format_args!("client went away before the 200: {e}")),
            );
            return;
        }
    };
    log.opened();
    let outcome = {
        let relay = std::pin::pin!(crate::copy::tcp_to_h2(up, send, body));
        enforce(node, who, changes, relay).await
    };
    match &outcome {
        // `sent` is what the far side sent back: the client controls what it sends, not that.
        Ok(t) => guard.tunnel_ended(t.sent, t.reset),
        // Dropping the relay reset the client's stream; reset the far side too.
        Err(_) => crate::copy::reset_on_drop(up),
    }
    settle(log, enabled, outcome, Some(client));
}

/// Dials the far side of a terminated CONNECT (`far_side`: inbound's app, the east-west
/// gateway's endpoint) under the stream's guard, which caps the connection's dials and drops
/// this one if the client resets the stream first (reliability #7). Gives `respond` back with
/// the connection; otherwise the client has been answered 503 (nothing if it reset the stream)
/// and the connection logged.
pub(crate) async fn dial_far_side(
    guard: &crate::hbone::server::StreamGuard,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
    dial: impl std::future::Future<Output = Result<tokio::net::TcpStream, crate::socket::DialError>>,
    log: &ConnLog,
    enabled: bool,
    far_side: &str,
) -> Option<(
    tokio::net::TcpStream,
    h2::server::SendResponse<bytes::Bytes>,
)> {
    match guard.dial(&mut respond, dial).await {
        Ok(Ok(up)) => Some((up, respond)),
        Ok(Err(e)) => {
            crate::hbone::server::refuse(respond, http::StatusCode::SERVICE_UNAVAILABLE);
            log.emit(enabled, Some(&format_args!("{e} (503)")));
            None
        }
        Err(crate::hbone::server::Abandoned) => {
            log.emit(
                enabled,
                Some(&format_args!(
                    "client reset the stream before the {far_side} was reached; dial abandoned"
                )),
            );
            None
        }
    }
}

/// Runs a proxied connection to its end unless a reload publishes policies that deny it: then
/// the connection's future is dropped (closing both sides) and the deciding policy returned.
/// `changes` must have been subscribed before the connection was first judged, so a reload in
/// between is not missed. `who` describes the connection on demand: it is only needed when the
/// policies change, so an idle connection does not carry a second copy of its identity.
///
/// The connection is taken pinned in place: moving a future into an async fn and pinning it
/// there stores it twice in the task (measured: +1.3 KiB per idle inbound connection).
pub(crate) async fn enforce<F: std::future::Future>(
    node: &Node,
    who: impl Fn() -> policy::Connection,
    mut changes: watch::Receiver<Arc<State>>,
    mut conn: std::pin::Pin<&mut F>,
) -> Result<F::Output, Decision> {
    loop {
        tokio::select! {
            out = conn.as_mut() => return Ok(out),
            r = changes.changed() => {
                if r.is_err() {
                    // The node is gone; nothing can change any more.
                    return Ok(conn.await);
                }
                let state = changes.borrow_and_update().clone();
                let d = state.policies.evaluate(&who());
                if !d.allowed {
                    node.stats.policy_denied.fetch_add(1, Ordering::Relaxed);
                    node.stats.policy_closed.fetch_add(1, Ordering::Relaxed);
                    return Err(d);
                }
            }
        }
    }
}

/// An inbound connection as policy judges it: the caller's identity (none for plaintext) and
/// address, and the destination workload with the real target port.
pub fn inbound_connection(
    src_identity: Option<&SpiffeId>,
    src: SocketAddr,
    dst: SocketAddr,
    workload: &Workload,
) -> policy::Connection {
    policy::Connection {
        src_identity: src_identity.cloned(),
        src_ip: src.ip(),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
        dst_workload: policy::WorkloadRef {
            name: workload.name.clone(),
            namespace: workload.namespace.clone(),
        },
    }
}

/// Dials the local app for an inbound connection from `peer`: from the peer's own address
/// (IP_TRANSPARENT) unless `node.original_source` is off, inside the scope's namespace, with
/// the tunnel's mark.
pub(crate) async fn dial_app(
    node: &Node,
    scope: &Scope,
    dst: SocketAddr,
    peer: SocketAddr,
) -> Result<tokio::net::TcpStream, crate::socket::DialError> {
    let original = node.cfg.node.original_source;
    let opts = crate::socket::DialOptions {
        mark: node.mark(),
        source: original.then_some(peer.ip()),
        transparent: original,
    };
    // Boxed: the dial future is large and would otherwise stay in the connection's task.
    Box::pin(crate::socket::dial_in(scope.dial_netns(), dst, opts)).await
}

/// Logs the end of an enforced relay: completed with its byte counts, or closed by a policy
/// change (the caller has already reset what must be reset).
pub(crate) fn settle(
    mut log: ConnLog,
    enabled: bool,
    outcome: Result<crate::copy::Transfer, Decision>,
    identity: Option<&SpiffeId>,
) {
    let d = match outcome {
        Ok(transfer) => {
            log.transfer = transfer;
            return log.emit(enabled, None);
        }
        Err(d) => d,
    };
    let reason = denial_reason(&d);
    tracing::info!(
        src = %log.src,
        dst = %log.dst,
        identity = identity.map(|i| i.to_string()).unwrap_or_default(),
        reason,
        "connection closed due to policy change"
    );
    log.emit(
        enabled,
        Some(&format_args!(
            "connection closed due to policy change: {reason}"
        )),
    );
}

/// How a denial reads in logs: the deciding policy, or why there is none.
pub(crate) fn denial_reason(d: &Decision) -> String {
    match &d.decided_by {
        Some(p) => format!("denied by policy {p}"),
        None => "denied: ALLOW policies apply to this workload and none matched".to_string(),
    }
}

/// Where a set of listeners works: the node's own namespace (host mode) or one pod's (in-pod
/// mode, docs/capture.md), with the HBONE pool and source identity that go with it.
pub struct Scope {
    /// The pod's namespace: upstream sockets are made there. None in host mode.
    pub netns: Option<Arc<PodNetns>>,
    pub pool: Arc<Pool>,
    /// Which workload these listeners serve: found by address (host mode), or one pod's as
    /// the model has it now (in-pod).
    pub serves: Serves,
    /// Flips (or closes) when the scope is torn down: its open connections end at once.
    pub kill: watch::Receiver<bool>,
    /// The node-wide count of connections in flight.
    pub active: Arc<AtomicUsize>,
}

/// Counts one proxied connection for as long as it lives.
/// Counts a connection in a listener's in-flight count for as long as it lives (what a drain
/// waits for). Shared by the node's listeners and the waypoint's.
pub(crate) struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    pub(crate) fn new(active: Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(active)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Scope {
    pub fn dial_netns(&self) -> Option<&PodNetns> {
        self.netns.as_deref()
    }

    /// The workload this scope's connections belong to: `Ok(None)` in host mode (the caller
    /// finds it by address), `Ok(Some)` for a pod the model knows, and `Err` for a pod it does
    /// not know (yet, or any more): the caller must refuse the connection (fail closed).
    pub fn bound_workload(&self) -> Result<Option<Arc<Workload>>, &PodBinding> {
        match &self.serves {
            Serves::ByAddress => Ok(None),
            Serves::Pod(pod) => match pod.workload.borrow().clone() {
                Some(w) => Ok(Some(w)),
                None => Err(pod),
            },
        }
    }
}

/// Which workload a scope's listeners serve.
pub enum Serves {
    /// Host mode: each connection's workload is found by its address.
    ByAddress,
    /// In-pod: one pod, bound to its workload in the model once the model has it.
    Pod(PodBinding),
}

/// A pod handed over by ZDS and the model's workload for it, kept current by the pod's binding
/// watcher (`inpod`). None while the model does not know the pod: its connections are refused
/// (reset, counted under the reason `pod_workload_unknown`), never relayed in plaintext.
pub struct PodBinding {
    /// Shared, not copied, by each connection's removal watch.
    pub uid: Arc<str>,
    /// The pod as ZDS named it ("namespace/name"), for the refusal's log line.
    pub pod: String,
    pub workload: watch::Receiver<Option<Arc<Workload>>>,
    /// The node's count of connections closed because their pod's workload left the model.
    pub closed: Arc<AtomicU64>,
}

impl PodBinding {
    /// The log line of a connection refused because the model does not know this pod.
    pub fn unknown_reason(&self) -> String {
        format!(
            "pod {} (uid {:?}) is not a workload in the model yet (or any more): connection refused until it is (fail closed)",
            self.pod, self.uid
        )
    }
}

/// The listeners' bound addresses (useful when a config asks for port 0 in tests).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub outbound: SocketAddr,
    pub inbound_plaintext: SocketAddr,
    pub hbone: SocketAddr,
    pub readiness: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: SocketAddr,
    /// The DNS proxy (UDP and TCP on one address), when `node.dns.enabled` (host mode).
    pub dns: Option<SocketAddr>,
}

/// A running node: listeners plus the shutdown switch.
pub struct Running {
    pub node: Arc<Node>,
    pub bound: Bound,
    shutdown: watch::Sender<bool>,
    /// Host-mode connections live as long as the process: this sender is never flipped.
    _host_kill: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting and waits for the accept loops to end. Connections already accepted go
    /// on; `drain` waits for them.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.node.keep_draining(self._host_kill);
    }
}

/// Waits until no connection is in flight, or until `deadline`, whichever comes first; at the
/// deadline the connections still open are closed (their scopes' kill switches flip, which
/// drops each relay and closes both sockets). Returns how many were cut.
pub async fn drain(node: &Node, deadline: std::time::Duration) -> usize {
    let left = wait_idle(&node.active, deadline).await;
    if left > 0 {
        for kill in node.draining.lock().expect("drain lock poisoned").iter() {
            let _ = kill.send(true);
        }
    }
    left
}

/// Waits until `active` reaches zero or `deadline` passes; returns what is still open.
/// Polling keeps the data path free of drain bookkeeping; 50 ms is far below any deadline.
pub(crate) async fn wait_idle(active: &AtomicUsize, deadline: std::time::Duration) -> usize {
    let end = tokio::time::Instant::now() + deadline;
    while active.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < end {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    active.load(Ordering::Acquire)
}

fn bind(
    role: &'static str,
    addr: SocketAddr,
    transparent: bool,
) -> Result<TcpListener, StartError> {
    listen(addr, transparent).map_err(|source| StartError::Listen { role, addr, source })
}

/// Binds every listener and starts serving.
pub async fn start(node: Arc<Node>) -> Result<Running, StartError> {
    crate::xds::spawn(&node);
    if node.cfg.node.mode == Mode::InPod {
        return start_in_pod(node).await;
    }
    let cfg = &node.cfg;
    let p = &cfg.node.ports;
    let outbound = bind("outbound", cfg.listen_addr(p.outbound), true)?;
    let plain = bind(
        "inbound plaintext",
        cfg.listen_addr(p.inbound_plaintext),
        true,
    )?;
    let hbone = bind("HBONE", cfg.listen_addr(p.hbone), false)?;
    let ready = bind("readiness", cfg.listen_addr(p.readiness), false)?;
    let metrics = bind("metrics", cfg.listen_addr(p.metrics), false)?;
    let admin = bind("admin", admin::admin_addr(cfg.node.bind, p.admin), false)?;
    let dns = bind_dns(cfg)?;
    let addr = |l: &TcpListener| l.local_addr().expect("bound listener has an address");
    let bound = Bound {
        outbound: addr(&outbound),
        inbound_plaintext: addr(&plain),
        hbone: addr(&hbone),
        readiness: addr(&ready),
        metrics: addr(&metrics),
        admin: addr(&admin),
        dns: dns
            .as_ref()
            .map(|d| d.local_addr().expect("bound socket has an address")),
    };
    let (tx, rx) = watch::channel(false);
    let (host_kill, kill) = watch::channel(false);
    let scope = node.host_scope(kill);
    let mut tasks = spawn_listeners(&node, scope.clone(), outbound, plain, hbone, &rx);
    if let Some(dns) = dns {
        tasks.push(spawn_dns(&node, scope, dns, &rx));
    }
    if let Some(target) = cfg
        .node
        .east_west_gateway
        .as_ref()
        .and_then(|g| g.control_plane)
    {
        if passthrough_loops(target) {
            return Err(StartError::PassthroughLoop(target));
        }
        let port = crate::config::networks::CONTROL_PLANE_PORT;
        let l = bind("control-plane passthrough", cfg.listen_addr(port), false)?;
        tracing::info!(listen = %addr(&l), %target, "east-west gateway passes the control plane through");
        tasks.push(tokio::spawn(passthrough::control_plane_passthrough(
            node.mark(),
            l,
            target,
            rx.clone(),
            passthrough::PassthroughLimits::default(),
        )));
    }
    spawn_control(&node, admin, metrics)?;
    tasks.push(tokio::spawn(readiness::serve(
        node.clone(),
        ready,
        rx.clone(),
        false,
    )));
    tasks.push(spawn_renewals(&node, &rx));
    node.ready.store(true, Ordering::Release);
    tracing::info!(
        node = %cfg.node.name,
        outbound = %bound.outbound,
        inbound_plaintext = %bound.inbound_plaintext,
        hbone = %bound.hbone,
        readiness = %bound.readiness,
        metrics = %bound.metrics,
        admin = %bound.admin,
        local_workloads = node.model().local_workloads().count(),
        "zmesh node ready"
    );
    Ok(Running {
        node,
        bound,
        shutdown: tx,
        _host_kill: host_kill,
        tasks,
    })
}

/// The host's DNS proxy sockets, when `node.dns` is on.
fn bind_dns(cfg: &Config) -> Result<Option<crate::dns::DnsListeners>, StartError> {
    let d = &cfg.node.dns;
    if !d.enabled {
        return Ok(None);
    }
    let addr = SocketAddr::new(d.bind, d.port);
    crate::dns::DnsListeners::bind(addr)
        .map(Some)
        .map_err(|source| StartError::Listen {
            role: "DNS",
            addr,
            source,
        })
}

/// The DNS proxy's view of a scope: the node's model, and the namespace of the client (the
/// pod's in in-pod mode; in host mode, the workload's at the query's source address).
struct DnsClients {
    node: Arc<Node>,
    scope: Arc<Scope>,
}

impl crate::dns::Clients for DnsClients {
    fn model(&self) -> Arc<Model> {
        self.node.model()
    }

    fn namespace(&self, ip: IpAddr) -> Option<String> {
        match self.scope.bound_workload() {
            Ok(Some(w)) => Some(w.namespace.clone()),
            Ok(None) => self
                .node
                .model()
                .workload_by_ip(ip)
                .map(|w| w.namespace.clone()),
            // A pod the model does not know: no namespace, so only cluster-wide names resolve.
            Err(_) => None,
        }
    }
}

/// The upstream resolvers of the node's DNS proxies: `node.dns.upstreams`, else the nameservers
/// of `node.dns.resolv_conf` (read once, at start); and where they came from.
pub(crate) fn dns_upstreams(cfg: &crate::config::dns::DnsConfig) -> (Vec<SocketAddr>, String) {
    if !cfg.upstreams.is_empty() {
        return (cfg.upstreams.clone(), "node.dns.upstreams".into());
    }
    let origin = cfg.resolv_conf.display().to_string();
    match std::fs::read_to_string(&cfg.resolv_conf) {
        Ok(text) => (crate::dns::upstream::parse_resolv_conf(&text), origin),
        Err(e) => {
            tracing::warn!(path = %origin, error = %e, "cannot read the DNS proxy's resolv.conf: names the mesh does not know get SERVFAIL");
            (Vec::new(), origin)
        }
    }
}

/// Serves a scope's DNS proxy until `stop`; its upstream sockets are made in the scope's
/// namespace and carry the node's mark.
pub(crate) fn spawn_dns(
    node: &Arc<Node>,
    scope: Arc<Scope>,
    listeners: crate::dns::DnsListeners,
    stop: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    let d = &node.cfg.node.dns;
    let (servers, origin) = dns_upstreams(d);
    let own = listeners
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::new(d.bind, d.port));
    let upstream = crate::dns::upstream::Upstream::new(
        servers,
        origin,
        own,
        d.upstream_timeout,
        scope.netns.clone(),
        node.mark(),
    );
    let server = crate::dns::Server::new(
        Arc::new(DnsClients {
            node: node.clone(),
            scope,
        }),
        upstream,
        d,
        node.metrics.dns.clone(),
    );
    tokio::spawn(crate::dns::serve(Arc::new(server), listeners, stop.clone()))
}

/// One scope's three listeners: outbound (15001), plaintext inbound (15006), HBONE (15008).
fn spawn_listeners(
    node: &Arc<Node>,
    scope: Arc<Scope>,
    outbound: TcpListener,
    plain: TcpListener,
    hbone: TcpListener,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(outbound::serve(
            node.clone(),
            scope.clone(),
            outbound,
            stop.clone(),
        )),
        tokio::spawn(plaintext::serve(
            node.clone(),
            scope.clone(),
            plain,
            stop.clone(),
        )),
        tokio::spawn(inbound::serve(node.clone(), scope, hbone, stop.clone())),
    ]
}

/// The control runtime: one thread with a current-thread scheduler for the admin server, the
/// metrics endpoint and the config watcher, so operating the node never takes a data-plane
/// worker (and a busy data plane never starves a scrape). Shared by every node of the process.
pub fn control() -> &'static tokio::runtime::Handle {
    static CONTROL: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();
    CONTROL.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the control runtime starts");
        let handle = rt.handle().clone();
        std::thread::Builder::new()
            .name("zmesh-control".into())
            .spawn(move || rt.block_on(std::future::pending::<()>()))
            .expect("spawning the control thread");
        handle
    })
}

/// Moves the admin and metrics listeners to the control runtime. Neither stops with the
/// listeners: both stay up through a drain, until the process exits.
fn spawn_control(
    node: &Arc<Node>,
    admin: TcpListener,
    metrics: TcpListener,
) -> Result<(), StartError> {
    let to_std = |l: TcpListener, role| {
        let addr = l.local_addr().expect("bound listener has an address");
        l.into_std()
            .map_err(|source| StartError::Listen { role, addr, source })
    };
    let (admin, metrics) = (to_std(admin, "admin")?, to_std(metrics, "metrics")?);
    let node = node.clone();
    control().spawn(async move {
        // A listener belongs to the runtime it is registered with: re-register here.
        let (Ok(admin), Ok(metrics)) =
            (TcpListener::from_std(admin), TcpListener::from_std(metrics))
        else {
            tracing::error!("cannot move the admin and metrics listeners to the control runtime");
            return;
        };
        // Metrics outlive a drain: this sender is kept, so the server never sees a stop.
        let (_never_stop, stop) = watch::channel(false);
        tokio::spawn(admin::serve(node.clone(), admin));
        readiness::serve(node, metrics, stop, true).await;
    });
    Ok(())
}

/// Certificate renewal at half-life, until shutdown.
fn spawn_renewals(node: &Node, stop: &watch::Receiver<bool>) -> JoinHandle<()> {
    let certs = node.certs.clone();
    let mut stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = certs.run_renewals() => {}
            _ = stop.changed() => {}
        }
    })
}

/// In-pod mode: only readiness listens in the node's namespace; the pod proxies come and go with
/// ZDS. Ready once the first snapshot is in and every pod proxy in it is up.
async fn start_in_pod(node: Arc<Node>) -> Result<Running, StartError> {
    let cfg = &node.cfg;
    check_in_pod_dns(&cfg.node.dns)?;
    let p = &cfg.node.ports;
    let ready = bind("readiness", cfg.listen_addr(p.readiness), false)?;
    let metrics = bind("metrics", cfg.listen_addr(p.metrics), false)?;
    let admin = bind("admin", admin::admin_addr(cfg.node.bind, p.admin), false)?;
    let in_pod = |port| SocketAddr::new(std::net::IpAddr::from([0, 0, 0, 0]), port);
    let bound = Bound {
        outbound: in_pod(p.outbound),
        inbound_plaintext: in_pod(p.inbound_plaintext),
        hbone: in_pod(p.hbone),
        readiness: ready.local_addr().expect("bound listener has an address"),
        metrics: metrics.local_addr().expect("bound listener has an address"),
        admin: admin.local_addr().expect("bound listener has an address"),
        dns: cfg
            .node
            .dns
            .enabled
            .then(|| SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), cfg.node.dns.port)),
    };
    let (tx, rx) = watch::channel(false);
    let (host_kill, _) = watch::channel(false);
    let (state_tx, mut state_rx) = watch::channel(inpod::InPodState::default());
    spawn_control(&node, admin, metrics)?;
    let tasks = vec![
        tokio::spawn(inpod::run(
            node.clone(),
            cfg.node.zds_socket.clone(),
            state_tx,
            rx.clone(),
        )),
        tokio::spawn(readiness::serve(node.clone(), ready, rx.clone(), false)),
        tokio::spawn({
            let node = node.clone();
            async move {
                while state_rx.changed().await.is_ok() {
                    let s = *state_rx.borrow();
                    node.ready.store(s.snapshot_received, Ordering::Release);
                    node.zds_pods.store(s.pods, Ordering::Relaxed);
                }
            }
        }),
        spawn_renewals(&node, &rx),
    ];
    tracing::info!(
        node = %cfg.node.name,
        zds = %cfg.node.zds_socket.display(),
        readiness = %bound.readiness,
        "zmesh node started in in-pod mode; waiting for the ZDS snapshot"
    );
    Ok(Running {
        node,
        bound,
        shutdown: tx,
        _host_kill: host_kill,
        tasks,
    })
}

/// For a connection of a pod proxy: resolves (with the pod's uid and the closed-connection
/// counter) when the pod stops being bound to the workload the connection is served as, that is
/// the first one bound at or after accept (the handler may find the pod bound a moment after the
/// accept loop saw it unbound). Removed, or replaced by one with another identity: both close
/// it. Host-mode connections get a future that never resolves.
fn removal_watch(
    scope: &Scope,
) -> impl std::future::Future<Output = Option<(Arc<str>, Arc<AtomicU64>)>> + Send + 'static {
    let pod = match &scope.serves {
        Serves::Pod(p) => Some((p.workload.clone(), p.uid.clone(), p.closed.clone())),
        Serves::ByAddress => None,
    };
    async move {
        if let Some((mut rx, uid, closed)) = pod {
            // Err: the pod proxy itself is gone, and its kill switch ends the connection.
            let served = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|w| w.as_ref().map(|w| w.identity.clone()));
            if let Some(identity) = served {
                let same = |w: &Option<Arc<crate::model::Workload>>| {
                    w.as_ref().is_some_and(|w| w.identity == identity)
                };
                if rx.wait_for(|w| !same(w)).await.is_ok() {
                    return Some((uid, closed));
                }
            }
        }
        std::future::pending().await
    }
}

/// Accepts connections until shutdown, spawning `handle` for each. Accept errors (such as
/// running out of file descriptors) are logged and retried after a pause instead of ending the
/// loop (reliability #29).
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    scope: &Scope,
    role: &'static str,
    rejections: &crate::rejections::Rejections,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    crate::socket::tune(&tcp);
                    // Boxed: moved into the wrapper below, an inline future would be stored
                    // twice in the task (measured: +1.5-2 KiB per idle connection).
                    let conn = Box::pin(handle(tcp, peer));
                    let mut kill = scope.kill.clone();
                    let active = ActiveGuard::new(scope.active.clone());
                    let removal = removal_watch(scope);
                    tokio::spawn(async move {
                        let _active = active;
                        // A torn-down scope (deleted pod) ends its connections now, and so does a
                        // pod whose workload leaves the model; dropping the handler closes its
                        // sockets.
                        tokio::select! {
                            _ = conn => {}
                            _ = kill.wait_for(|k| *k) => {}
                            Some((uid, closed)) = removal => {
                                closed.fetch_add(1, Ordering::Relaxed);
                                tracing::info!(uid = &*uid, listener = role, src = %peer, reason_code = "pod_workload_removed", "connection closed: the pod's workload left the model or changed identity (fail closed)");
                            }
                        }
                    });
                }
                Err(e) => crate::rejections::accept_failed_counted(rejections, role, &e).await,
            },
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod dns_start_tests {
    use super::*;

    #[test]
    fn in_pod_start_refuses_a_loopback_resolver_from_resolv_conf() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        std::fs::write(&conf, "nameserver 127.0.0.53\noptions edns0\n").unwrap();
        let mut d = crate::config::dns::DnsConfig {
            enabled: true,
            resolv_conf: conf.clone(),
            ..Default::default()
        };
        let e = check_in_pod_dns(&d).unwrap_err().to_string();
        assert!(
            e.contains("node.dns.upstreams") && e.contains("127.0.0.53:53"),
            "{e}"
        );
        assert!(
            e.contains("kube-dns") && e.contains(&conf.display().to_string()),
            "{e}"
        );
        // A cluster resolver is fine; so is any resolver when the proxy is off.
        std::fs::write(&conf, "nameserver 10.96.0.10\n").unwrap();
        assert!(check_in_pod_dns(&d).is_ok());
        std::fs::write(&conf, "nameserver 127.0.0.1\n").unwrap();
        d.enabled = false;
        assert!(check_in_pod_dns(&d).is_ok());
    }
}
