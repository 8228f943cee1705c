//! The local configuration file: node settings, workloads and services in one strict YAML file.
//!
//! The file is parsed once into typed structs. Unknown fields and wrong types are refused with the
//! file, line and column serde_yaml reports; cross-field checks (duplicate uids, bad references)
//! name the path of the offending entry and its value. Every field has a documented default, and
//! the README shows a complete example (examples/*.yaml are tested to load).
//!
//! Before the YAML parser sees the text, [`guard`] bounds it (reliability #40): at most
//! [`guard::MAX_BYTES`], nesting at most [`guard::MAX_DEPTH`] levels, no anchors or aliases. The
//! parser stays serde_yaml 0.9 (deprecated upstream): its maintained successors either keep the
//! same libyaml core, which is what is quadratic in flow nesting (serde_yaml_ng), or have no
//! `Value` type for the per-entry parsing of `policies` and need a newer Rust than this crate's
//! minimum (serde-saphyr 2.2: Rust 1.89). The guard does not depend on the parser, so it stays
//! when the parser is replaced.

pub mod connect;
pub mod control_plane;
pub mod dns;
pub mod guard;
pub mod networks;
pub mod workload_group;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::identity::SpiffeId;

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// istiod's default workload certificate lifetime.
const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Bounds on any one string in the file, so hostile input cannot balloon memory (reliability #24).
const MAX_STRING: usize = 4096;

/// The embedded default config: a single-node mesh with a dev CA under /var/lib/zmesh/ca.
pub const EMBEDDED_DEFAULT: &str = include_str!("../examples/default.yaml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Unlocated { path: String, message: String },
    #[error("{path}: config of {size} bytes is over the {limit}-byte limit (MAX_BYTES)")]
    TooLarge {
        path: String,
        size: u64,
        limit: usize,
    },
    #[error("{path}: {field} = {value:?}: {reason}")]
    Invalid {
        path: String,
        field: String,
        value: String,
        reason: String,
    },
}

impl ConfigError {
    /// Line and column of the error, when the parser knew them.
    pub fn location(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Syntax { line, column, .. } => Some((*line, *column)),
            _ => None,
        }
    }
}

/// Whole-file schema.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// L4 authorization policies (policy.rs has the schema). Kept as raw YAML here so that one
    /// broken policy cannot hide the others, and is enforced as deny-all over its scope instead
    /// of refusing the whole file: a typo in a DENY must never leave the old, more open, policy
    /// set running (fail closed).
    #[serde(default)]
    pub policies: Vec<serde_yaml::Value>,
    /// The waypoint binary's own workload (`zmesh-waypoint` reads it; the node ignores it).
    #[serde(default)]
    pub waypoint: Option<crate::waypoint::config::WaypointSettings>,
    /// HTTP routes applied by waypoints (docs/waypoint.md).
    #[serde(default)]
    pub routes: Vec<crate::waypoint::config::RouteConfig>,
    /// L7 authorization policies applied by waypoints.
    #[serde(default)]
    pub http_policies: Vec<crate::waypoint::config::HttpPolicyConfig>,
    /// JWT validation applied by waypoints.
    #[serde(default)]
    pub request_authentication: Vec<crate::waypoint::config::RequestAuthConfig>,
    /// Other networks and their east-west gateways (docs/model.md "Networks").
    #[serde(default)]
    pub networks: Vec<networks::NetworkConfig>,
    /// WorkloadGroups VMs auto-register from (a control plane's mesh file only).
    #[serde(default)]
    pub workload_groups: Vec<workload_group::WorkloadGroupConfig>,
    /// Client-only access (`zmesh-node connect`): this machine's workload, port maps, SOCKS5
    /// and who may use them (docs/capture.md "Client-only access").
    #[serde(default)]
    pub connect: Option<connect::ConnectConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name; workloads whose `node` equals it are local and proxied here.
    pub name: BoundedString,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: BoundedString,
    /// Cluster name sent in `baggage` (k8s.cluster.name).
    #[serde(default = "default_cluster")]
    pub cluster: BoundedString,
    /// Address the node-wide listeners bind (host mode). Default: all addresses.
    #[serde(default = "default_bind")]
    pub bind: IpAddr,
    #[serde(default)]
    pub ports: Ports,
    /// Whether 15006 accepts plaintext from non-mesh clients.
    #[serde(default)]
    pub inbound_plaintext: InboundPlaintext,
    /// Refuse outbound connections to destinations the model does not know (no passthrough).
    #[serde(default)]
    pub registry_only: bool,
    /// The network this node is on; workloads without one are on it too. Default "" (Istio's
    /// default network).
    #[serde(default)]
    pub network: BoundedString,
    /// Run as an east-west gateway for this network (docs/model.md "Networks").
    #[serde(default)]
    pub east_west_gateway: Option<networks::EastWestGateway>,
    /// Inbound: dial the local app from the original client's IP (IP_TRANSPARENT, docs/capture.md),
    /// so the app and its logs see who called. `false` dials from the node's own address
    /// (ztunnel's `ENABLE_ORIG_SRC=false`), for hosts without the policy-routing rules.
    #[serde(default = "default_original_source")]
    pub original_source: bool,
    #[serde(default)]
    pub access_log: AccessLogFormat,
    pub certificates: CertificatesConfig,
    /// Data-plane worker threads; 0 = the container's CPU limit (cgroup v2 `cpu.max`, else v1
    /// CFS quota), rounded up, else one per available CPU (`workers`).
    #[serde(default)]
    pub worker_threads: usize,
    /// host: proxy the workloads of this machine from its own namespace (VMs);
    /// in_pod: receive pod namespaces over ZDS and proxy each from inside its pod (Kubernetes).
    #[serde(default)]
    pub mode: Mode,
    /// The ZDS socket the redirect agent (or istio-cni) listens on (in_pod mode).
    #[serde(default = "default_zds_socket")]
    pub zds_socket: PathBuf,
    /// After SIGTERM, how long accepted connections may go on before the process exits.
    /// Default 25s: Kubernetes' 30 s grace period minus 5 s of margin.
    #[serde(default = "default_drain", deserialize_with = "de_duration")]
    pub drain_timeout: Duration,
    /// TLS handshake plus HTTP/2 preface deadline on the HBONE port (slowloris guard).
    #[serde(
        default = "default_handshake_timeout",
        deserialize_with = "de_duration"
    )]
    pub handshake_timeout: Duration,
    /// Deadline of a whole outgoing HBONE dial (TCP connect, TLS and HTTP/2 handshakes), and of
    /// waiting for another connection's dial to the same peer. Default 10s.
    #[serde(default = "default_connect_timeout", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval on every HBONE connection, client and server side. Default 10s.
    #[serde(default = "default_ping_interval", deserialize_with = "de_duration")]
    pub ping_interval: Duration,
    /// How long a PING may go unanswered before the HBONE connection is dropped (its streams
    /// reset, the pool forgets it). A dead peer is noticed within `ping_interval +
    /// ping_timeout`. Default 20s.
    #[serde(default = "default_ping_timeout", deserialize_with = "de_duration")]
    pub ping_timeout: Duration,
    /// Certificate revocation lists (PEM `X509 CRL` blocks or one DER CRL) checked at every
    /// handshake; when the file changes, live tunnels whose peer chain became revoked are cut.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// Workloads, services and policies from a control plane over xDS (istiod, or
    /// `zmesh-node ca serve --xds`) instead of this file (docs/model.md "Control plane").
    #[serde(default, deserialize_with = "de_control_plane")]
    pub control_plane: Option<control_plane::ControlPlaneConfig>,
    /// The DNS proxy (docs/capture.md "DNS proxy"); off by default.
    #[serde(default)]
    pub dns: dns::DnsConfig,
}

fn de_control_plane<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<control_plane::ControlPlaneConfig>, D::Error> {
    // The cluster id defaults to `node.cluster`, which serde cannot see from here: left empty
    // and filled in by `Config::parse`.
    let raw = Option::<control_plane::ControlPlaneRaw>::deserialize(d)?;
    if let Some(why) = raw.as_ref().and_then(|r| r.metadata_error()) {
        return Err(serde::de::Error::custom(format!(
            "node.control_plane.metadata: {why}"
        )));
    }
    Ok(raw.map(|r| r.build("")))
}

fn default_original_source() -> bool {
    true
}

fn default_handshake_timeout() -> Duration {
    crate::hbone::HANDSHAKE_TIMEOUT
}

fn default_connect_timeout() -> Duration {
    crate::hbone::client::CONNECT_TIMEOUT
}

fn default_ping_interval() -> Duration {
    crate::hbone::PING_INTERVAL
}

fn default_ping_timeout() -> Duration {
    crate::hbone::PING_TIMEOUT
}

impl NodeConfig {
    /// The PING keepalive of this node's HBONE connections.
    pub fn keepalive(&self) -> crate::hbone::Keepalive {
        crate::hbone::Keepalive {
            interval: self.ping_interval,
            timeout: self.ping_timeout,
        }
    }
}

fn default_drain() -> Duration {
    Duration::from_secs(25)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Host,
    InPod,
}

/// istio-cni's default path, so either agent can drive zmesh-node.
fn default_zds_socket() -> PathBuf {
    PathBuf::from("/var/run/ztunnel/ztunnel.sock")
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ports {
    /// HBONE port, inbound here and on every peer node (Istio: 15008).
    #[serde(default = "p15008")]
    pub hbone: u16,
    #[serde(default = "p15001")]
    pub outbound: u16,
    #[serde(default = "p15006")]
    pub inbound_plaintext: u16,
    #[serde(default = "p15021")]
    pub readiness: u16,
    /// Prometheus metrics (`/metrics`, `/stats/prometheus`), Istio's 15020.
    #[serde(default = "p15020")]
    pub metrics: u16,
    /// The admin server, always on a loopback address (`proxy::admin::admin_addr`).
    #[serde(default = "p15000")]
    pub admin: u16,
}

impl Ports {
    /// Every port the node listens on: a destination that names one of them on a local
    /// address is the node itself and is never dialed (docs/reliability.md #38).
    pub fn all(&self) -> [u16; 6] {
        [
            self.hbone,
            self.outbound,
            self.inbound_plaintext,
            self.readiness,
            self.metrics,
            self.admin,
        ]
    }
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            hbone: 15008,
            outbound: 15001,
            inbound_plaintext: 15006,
            readiness: 15021,
            metrics: 15020,
            admin: 15000,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundPlaintext {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    #[default]
    Text,
    Json,
    Off,
}

/// Exactly one certificate source.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(try_from = "CertificatesRaw")]
pub enum CertificatesConfig {
    /// Dev only: the built-in CA, leaves issued on the node, so the CA key is on every node
    /// (`zmesh-node ca init` makes one). Meshes use `ca_client` against `zmesh-node ca serve`.
    FileCa { dir: PathBuf, ttl: Duration },
    /// Certificates provisioned elsewhere, one per identity.
    Static {
        roots: PathBuf,
        identities: Vec<StaticIdentity>,
    },
    /// A remote CA (istiod, or `zmesh-node ca serve`): keys made here, CSRs sent there.
    CaClient {
        target: control_plane::GrpcTarget,
        ttl: Duration,
        /// Ask on behalf of pods (`ImpersonatedIdentity`); false for a proxy's own identity.
        impersonate: bool,
    },
    /// `ca_client` as read, before `Config::parse` fills it from `node.control_plane`.
    #[doc(hidden)]
    CaClientUnresolved(control_plane::CaClientRaw),
}

/// The YAML shape of `node.certificates`: one of two keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificatesRaw {
    file_ca: Option<FileCaRaw>,
    #[serde(rename = "static")]
    static_: Option<StaticRaw>,
    ca_client: Option<control_plane::CaClientRaw>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCaRaw {
    dir: PathBuf,
    #[serde(default = "default_ttl", deserialize_with = "de_duration")]
    ttl: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticRaw {
    roots: PathBuf,
    identities: Vec<StaticIdentity>,
}

impl TryFrom<CertificatesRaw> for CertificatesConfig {
    type Error = String;
    fn try_from(raw: CertificatesRaw) -> Result<Self, String> {
        match (raw.file_ca, raw.static_, raw.ca_client) {
            (Some(f), None, None) => Ok(CertificatesConfig::FileCa {
                dir: f.dir,
                ttl: f.ttl,
            }),
            (None, Some(s), None) => Ok(CertificatesConfig::Static {
                roots: s.roots,
                identities: s.identities,
            }),
            (None, None, Some(c)) => Ok(CertificatesConfig::CaClientUnresolved(c)),
            _ => Err(
                "node.certificates needs exactly one of `file_ca` (dev only: the CA key on the node), `static` or `ca_client`"
                    .into(),
            ),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TunnelProtocol {
    /// Speaks HBONE: traffic to it is tunneled to its node's 15008.
    #[default]
    Hbone,
    /// Not in the mesh: traffic to it is plain TCP.
    Tcp,
}

/// Istio's `ApplicationTunnel.Protocol`: how the node hands a terminated tunnel's bytes to
/// the workload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AppTunnelProtocol {
    /// Plain bytes, as if there were no application tunnel.
    #[default]
    None,
    /// A PROXY v2 header first (original client, CONNECT target, TLV 0xD0 = the client's
    /// identity), then the bytes (docs/hbone.md "PROXY protocol").
    Proxy,
}

/// `application_tunnel:` of a workload (Istio's Workload field 23): opt-in, for workloads that
/// want to know who called them through the tunnel (a sandwiched waypoint).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationTunnel {
    #[serde(default)]
    pub protocol: AppTunnelProtocol,
    /// The workload port the node dials for every CONNECT (Istio's waypoints use 15088); 0,
    /// the default, keeps each CONNECT's own target port.
    #[serde(default)]
    pub port: u16,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    #[serde(default)]
    pub region: BoundedString,
    #[serde(default)]
    pub zone: BoundedString,
    #[serde(default)]
    pub subzone: BoundedString,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    pub uid: BoundedString,
    pub name: BoundedString,
    pub namespace: BoundedString,
    #[serde(default = "default_sa")]
    pub service_account: BoundedString,
    /// Defaults to the node's trust domain.
    #[serde(default)]
    pub trust_domain: Option<BoundedString>,
    pub addresses: Vec<IpAddr>,
    /// The node this workload runs on.
    pub node: BoundedString,
    #[serde(default)]
    pub protocol: TunnelProtocol,
    /// The kind of controller, for `baggage` (deployment, pod, job, cronjob).
    #[serde(default = "default_workload_type")]
    pub workload_type: BoundedString,
    #[serde(default)]
    pub canonical_name: Option<BoundedString>,
    #[serde(default)]
    pub canonical_revision: Option<BoundedString>,
    #[serde(default)]
    pub status: HealthStatus,
    /// Load-balancing weight among a service's endpoints.
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    #[serde(default)]
    pub locality: Locality,
    /// Services this workload backs: "namespace/hostname" → {service port: target port}.
    #[serde(default)]
    pub services: BTreeMap<BoundedString, BTreeMap<u16, u16>>,
    /// uid of the waypoint workload that handles traffic addressed to this workload's IP.
    #[serde(default)]
    pub waypoint: Option<BoundedString>,
    /// How the node hands this workload the bytes of a tunnel it terminates; absent (or
    /// protocol NONE): plain bytes to the CONNECT's target port.
    #[serde(default)]
    pub application_tunnel: Option<ApplicationTunnel>,
    /// The network the workload is on; absent: the node's.
    #[serde(default)]
    pub network: Option<BoundedString>,
    /// From xDS only (the file names gateways in `networks:`).
    #[serde(skip)]
    pub network_gateway: Option<networks::NetworkGatewayRef>,
}

impl WorkloadConfig {
    /// The canonical service name telemetry uses: `canonical_name`, else the name.
    pub fn canonical_name(&self) -> &str {
        self.canonical_name.as_deref().unwrap_or(&self.name)
    }

    /// The canonical revision: `canonical_revision`, else `latest`.
    pub fn canonical_revision(&self) -> &str {
        self.canonical_revision.as_deref().unwrap_or("latest")
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancingMode {
    /// Prefer closer endpoints, fall back to any.
    #[default]
    Standard,
    /// Only endpoints matching every routing-preference field.
    Strict,
    /// Prefer closer endpoints, fall back tier by tier.
    Failover,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingScope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancing {
    #[serde(default)]
    pub mode: LoadBalancingMode,
    #[serde(default)]
    pub routing_preference: Vec<RoutingScope>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: BoundedString,
    pub namespace: BoundedString,
    pub hostname: BoundedString,
    #[serde(default)]
    pub vips: Vec<IpAddr>,
    /// Service port → default target port (a workload's own port map overrides it).
    pub ports: BTreeMap<u16, u16>,
    /// Extra identities a client accepts from this service's endpoints.
    #[serde(default)]
    pub subject_alt_names: Vec<SpiffeIdString>,
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// uid of the waypoint workload that handles this service's traffic (L7); clients send
    /// HBONE to it instead of to an endpoint.
    #[serde(default)]
    pub waypoint: Option<BoundedString>,
    /// Circuit breaking and outlier ejection, applied by waypoints sending to this service
    /// (Istio DestinationRule `trafficPolicy`).
    #[serde(default)]
    pub traffic_policy: Option<crate::waypoint::config::TrafficPolicy>,
    /// Declared protocol per service port (Kubernetes `appProtocol`): `tcp` makes a waypoint
    /// relay that port's bytes without looking at them; undeclared ports are sniffed.
    #[serde(default)]
    pub app_protocols: BTreeMap<u16, AppProtocol>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    Http,
    Tcp,
}

/// A string with a length bound, checked while parsing so the error carries a line number.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BoundedString(pub String);

impl<'de> Deserialize<'de> for BoundedString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() > MAX_STRING {
            return Err(serde::de::Error::custom(format!(
                "string of {} bytes is over the {MAX_STRING}-byte limit",
                s.len()
            )));
        }
        Ok(BoundedString(s))
    }
}

impl fmt::Display for BoundedString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for BoundedString {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for BoundedString {
    fn from(s: &str) -> Self {
        BoundedString(s.to_string())
    }
}

/// A SPIFFE ID validated during parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeIdString(pub SpiffeId);

impl<'de> Deserialize<'de> for SpiffeIdString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::parse(&s)
            .map(SpiffeIdString)
            .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

fn default_trust_domain() -> BoundedString {
    DEFAULT_TRUST_DOMAIN.into()
}
/// ztunnel's CLUSTER_ID default.
const DEFAULT_CLUSTER: &str = "Kubernetes";

fn default_cluster() -> BoundedString {
    DEFAULT_CLUSTER.into()
}
fn default_bind() -> IpAddr {
    IpAddr::from([0, 0, 0, 0])
}
pub(crate) fn default_sa() -> BoundedString {
    "default".into()
}
fn default_workload_type() -> BoundedString {
    "deployment".into()
}
fn default_capacity() -> u32 {
    1
}
fn default_ttl() -> Duration {
    DEFAULT_CERT_TTL
}
fn p15008() -> u16 {
    15008
}
fn p15001() -> u16 {
    15001
}
fn p15006() -> u16 {
    15006
}
fn p15021() -> u16 {
    15021
}
fn p15020() -> u16 {
    15020
}
fn p15000() -> u16 {
    15000
}

/// Parses durations such as `500ms`, `30s`, `10m`, `24h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {s:?} has no unit: use ms, s, m or h"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("duration {s:?} does not start with a whole number"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "duration {s:?} has unknown unit {unit:?}: use ms, s, m or h"
            ))
        }
    };
    Ok(d)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

impl Config {
    /// Reads and validates a config file. `${NAME}` is replaced by the environment variable
    /// NAME (upper-case letters, digits and `_`), so one ConfigMap serves every node
    /// (`${NODE_NAME}`, `${POD_IP}` from the downward API); an unset variable is an error.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        let origin = path.display().to_string();
        let read_error = |source| ConfigError::Read {
            path: origin.clone(),
            source,
        };
        let too_large = |size| ConfigError::TooLarge {
            path: origin.clone(),
            size,
            limit: guard::MAX_BYTES,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let size = file.metadata().map_err(read_error)?.len();
        if size > guard::MAX_BYTES as u64 {
            return Err(too_large(size));
        }
        // Read at most one byte past the limit: a file that grows while read, or one with no
        // size (a FIFO, a device), cannot make the node read without end.
        let mut text = String::new();
        file.take(guard::MAX_BYTES as u64 + 1)
            .read_to_string(&mut text)
            .map_err(read_error)?;
        if text.len() > guard::MAX_BYTES {
            return Err(too_large(text.len() as u64));
        }
        let text =
            expand_env(&text, |k| std::env::var(k).ok()).map_err(|var| ConfigError::Unlocated {
                path: origin.clone(),
                message: format!(
                    "environment variable {var} is referenced as ${{{var}}} but not set"
                ),
            })?;
        Config::parse(&text, &origin)
    }

    /// `load`, then ztunnel's environment variables over it (`apply_process_env`): what the
    /// node runs at start and on every reload, so a reload never drops an override.
    pub fn load_effective(path: &Path) -> Result<Config, ConfigError> {
        let mut cfg = Config::load(path)?;
        cfg.apply_process_env()
            .map_err(|message| ConfigError::Unlocated {
                path: path.display().to_string(),
                message: format!("environment: {message}"),
            })?;
        Ok(cfg)
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        if text.len() > guard::MAX_BYTES {
            return Err(ConfigError::TooLarge {
                path: origin.to_string(),
                size: text.len() as u64,
                limit: guard::MAX_BYTES,
            });
        }
        guard::check(text).map_err(|r| ConfigError::Syntax {
            path: origin.to_string(),
            line: r.line,
            column: r.column,
            message: r.message,
        })?;
        let mut cfg: Config = serde_yaml::from_str(text).map_err(|e| match e.location() {
            Some(loc) => ConfigError::Syntax {
                path: origin.to_string(),
                line: loc.line(),
                column: loc.column(),
                // serde_yaml appends " at line L column C"; we already lead with it.
                message: strip_location(&e.to_string()),
            },
            None => ConfigError::Unlocated {
                path: origin.to_string(),
                message: e.to_string(),
            },
        })?;
        let cluster = cfg.node.cluster.0.clone();
        if let Some(cp) = cfg.node.control_plane.as_mut() {
            if cp.target.cluster_id.is_empty() {
                cp.target.cluster_id = cluster;
            }
        }
        if let CertificatesConfig::CaClientUnresolved(raw) = &cfg.node.certificates {
            let (target, ttl, impersonate) = raw
                .clone()
                .build(cfg.node.control_plane.as_ref(), &cfg.node.cluster)
                .map_err(|message| ConfigError::Unlocated {
                    path: origin.to_string(),
                    message,
                })?;
            cfg.node.certificates = CertificatesConfig::CaClient {
                target,
                ttl,
                impersonate,
            };
        }
        cfg.validate(origin)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid =
            |field: String, value: &dyn fmt::Display, reason: &str| ConfigError::Invalid {
                path: origin.to_string(),
                field,
                value: value.to_string(),
                reason: reason.to_string(),
            };
        let n = &self.node;
        SpiffeId::new(&n.trust_domain, "x", "x")
            .map_err(|e| invalid("node.trust_domain".into(), &n.trust_domain, &e.to_string()))?;
        let p = &n.ports;
        for (name, port) in [
            ("hbone", p.hbone),
            ("outbound", p.outbound),
            ("inbound_plaintext", p.inbound_plaintext),
            ("readiness", p.readiness),
            ("metrics", p.metrics),
            ("admin", p.admin),
        ] {
            if port == 0 {
                return Err(invalid(
                    format!("node.ports.{name}"),
                    &port,
                    "port 0 cannot be listened on",
                ));
            }
        }
        n.dns
            .check(n.mode == Mode::InPod)
            .map_err(|(field, value, reason)| {
                invalid(format!("node.dns.{field}"), &value, reason)
            })?;
        if n.handshake_timeout.is_zero() {
            return Err(invalid(
                "node.handshake_timeout".into(),
                &"0s",
                "a zero deadline would refuse every HBONE client",
            ));
        }
        if n.connect_timeout.is_zero() {
            return Err(invalid(
                "node.connect_timeout".into(),
                &"0s",
                "a zero deadline would fail every HBONE dial",
            ));
        }
        if n.ping_interval.is_zero() {
            return Err(invalid(
                "node.ping_interval".into(),
                &"0s",
                "a zero interval would PING the peer without pause",
            ));
        }
        if n.ping_timeout.is_zero() {
            return Err(invalid(
                "node.ping_timeout".into(),
                &"0s",
                "a zero timeout would drop every HBONE connection at its first PING",
            ));
        }
        if let CertificatesConfig::FileCa { ttl, .. } = &n.certificates {
            if *ttl < Duration::from_secs(60) {
                return Err(invalid(
                    "node.certificates.file_ca.ttl".into(),
                    &format!("{ttl:?}"),
                    "certificates shorter than 1m would be renewed continuously",
                ));
            }
        }
        if n.control_plane.is_some()
            && !(self.workloads.is_empty() && self.services.is_empty() && self.policies.is_empty())
        {
            return Err(invalid(
                "node.control_plane".into(),
                &"set",
                "workloads, services and policies come from the control plane; remove them from the file",
            ));
        }
        for (i, w) in self.workloads.iter().enumerate() {
            let at = |f: &str| format!("workloads[{i}].{f}");
            if w.uid.is_empty() {
                return Err(invalid(at("uid"), &"", "a workload needs a non-empty uid"));
            }
            // A duplicate uid is not fatal (reliability #22): the first entry wins, and
            // `warnings` and the model's log say so.
            let td = w.trust_domain.as_ref().unwrap_or(&n.trust_domain);
            SpiffeId::new(td, &w.namespace, &w.service_account)
                .map_err(|e| invalid(at("service_account"), &w.service_account, &e.to_string()))?;
            if w.addresses.is_empty() {
                return Err(invalid(
                    at("addresses"),
                    &"[]",
                    "a workload needs at least one address",
                ));
            }
            for (svc, ports) in &w.services {
                if !svc.contains('/') {
                    return Err(invalid(
                        at("services"),
                        svc,
                        "service keys are \"namespace/hostname\"",
                    ));
                }
                if ports.iter().any(|(a, b)| *a == 0 || *b == 0) {
                    return Err(invalid(at("services"), svc, "port 0 is not a port"));
                }
            }
        }
        let by_uid: std::collections::HashMap<&str, &WorkloadConfig> = self
            .workloads
            .iter()
            .map(|w| (w.uid.0.as_str(), w))
            .collect();
        let check_waypoint = |field: String, uid: &Option<BoundedString>| match uid {
            None => Ok(()),
            Some(uid) => match by_uid.get(uid.0.as_str()) {
                None => Err(invalid(field, uid, "no workload has this uid")),
                Some(w) if w.protocol != TunnelProtocol::Hbone => Err(invalid(
                    field,
                    uid,
                    "a waypoint must speak HBONE (protocol: HBONE)",
                )),
                Some(_) => Ok(()),
            },
        };
        for (i, w) in self.workloads.iter().enumerate() {
            check_waypoint(format!("workloads[{i}].waypoint"), &w.waypoint)?;
        }
        for (i, s) in self.services.iter().enumerate() {
            check_waypoint(format!("services[{i}].waypoint"), &s.waypoint)?;
        }
        self.validate_l7(&invalid)?;
        networks::validate(&self.networks).map_err(|(f, v, r)| invalid(f, &v, &r))?;
        let mut groups = std::collections::HashSet::new();
        for (i, g) in self.workload_groups.iter().enumerate() {
            let at = |f: &str| format!("workload_groups[{i}].{f}");
            if g.name.is_empty() {
                return Err(invalid(at("name"), &"", "a workload group needs a name"));
            }
            SpiffeId::new(&n.trust_domain, &g.namespace, &g.service_account)
                .map_err(|e| invalid(at("service_account"), &g.service_account, &e.to_string()))?;
            if !groups.insert((g.namespace.0.as_str(), g.name.0.as_str())) {
                return Err(invalid(at("name"), &g.name, "duplicate workload group"));
            }
            if g.nodes.is_empty() {
                return Err(invalid(
                    at("nodes"),
                    &"[]",
                    "name the nodes that may register into this group (none would: nothing to serve)",
                ));
            }
            for (j, p) in g.nodes.iter().enumerate() {
                if let Some(why) = workload_group::WorkloadGroupConfig::node_pattern_error(p) {
                    return Err(invalid(at(&format!("nodes[{j}]")), p, why));
                }
            }
        }
        if n.control_plane.is_some() && !self.networks.is_empty() {
            return Err(invalid(
                "networks".into(),
                &"set",
                "with a control plane, gateways come from its workloads' network_gateway; remove networks from the file",
            ));
        }
        if let Some(gw) = &n.east_west_gateway {
            // From a control plane the workload arrives later: checked when a CONNECT comes.
            let found = self.workloads.iter().find(|w| w.uid == gw.workload);
            match found {
                None if n.control_plane.is_none() => {
                    return Err(invalid(
                        "node.east_west_gateway.workload".into(),
                        &gw.workload,
                        "no workload has this uid",
                    ))
                }
                Some(w) if w.node != n.name => {
                    return Err(invalid(
                        "node.east_west_gateway.workload".into(),
                        &gw.workload,
                        "the gateway's workload must run on this node",
                    ))
                }
                _ => {}
            }
            if let Some(cp) = gw.control_plane {
                let field = "node.east_west_gateway.control_plane".to_string();
                let own = cp.port() == networks::CONTROL_PLANE_PORT
                    && (cp.ip().is_loopback()
                        || cp.ip() == n.bind
                        || self
                            .workloads
                            .iter()
                            .any(|w| w.node == n.name && w.addresses.contains(&cp.ip())));
                if cp.port() == 0 || cp.ip().is_unspecified() {
                    return Err(invalid(field, &cp, "not an address to dial"));
                }
                if own {
                    return Err(invalid(
                        field,
                        &cp,
                        "this is the gateway's own passthrough port: it would pass through to itself",
                    ));
                }
                if n.mode == Mode::InPod {
                    return Err(invalid(
                        field,
                        &cp,
                        "the control-plane passthrough runs in host mode only",
                    ));
                }
            }
        }
        if let Some(section) = &self.connect {
            // The section's shape only: that its workload exists on this node is checked when
            // `connect` starts and per connection after that, so a reload whose file no longer
            // names it fails new connections closed instead of being refused (which would keep
            // the old identity serving).
            let none: Option<std::iter::Empty<(&str, &str)>> = None;
            connect::resolve(
                section,
                &self.node.name,
                none,
                &connect::ConnectFlags::default(),
            )
            .map_err(|e| ConfigError::Invalid {
                path: origin.to_string(),
                field: e.field,
                value: e.value,
                reason: e.reason,
            })?;
        }
        let mut hosts = std::collections::HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let key = format!("{}/{}", s.namespace, s.hostname);
            if !hosts.insert(key.clone()) {
                return Err(invalid(
                    format!("services[{i}].hostname"),
                    &key,
                    "duplicate service",
                ));
            }
            if s.ports.iter().any(|(a, b)| *a == 0 || *b == 0) {
                return Err(invalid(
                    format!("services[{i}].ports"),
                    &key,
                    "port 0 is not a port",
                ));
            }
        }
        Ok(())
    }

    /// The `connect:` section with the subcommand's `flags` added, checked against this file's
    /// workloads and node (docs/capture.md "Client-only access"). A file without the section
    /// is an error naming it: connect needs to know which workload this machine is.
    pub fn connect_settings(
        &self,
        origin: &str,
        flags: &connect::ConnectFlags,
    ) -> Result<connect::ConnectSettings, ConfigError> {
        let Some(section) = &self.connect else {
            return Err(ConfigError::Invalid {
                path: origin.to_string(),
                field: "connect".into(),
                value: "(missing)".into(),
                reason: "zmesh-node connect needs a `connect:` section with `workload:`, the uid of this machine's entry in `workloads:`".into(),
            });
        };
        // From a control plane the workloads are not in the file: checked per connection.
        let workloads = self.node.control_plane.is_none().then(|| {
            self.workloads
                .iter()
                .map(|w| (w.uid.0.as_str(), w.node.0.as_str()))
        });
        connect::resolve(section, &self.node.name, workloads, flags).map_err(|e| {
            ConfigError::Invalid {
                path: origin.to_string(),
                field: e.field,
                value: e.value,
                reason: e.reason,
            }
        })
    }

    /// Problems that do not stop the file from loading (reliability #22): a duplicate workload
    /// uid (the first entry is used) and an address claimed by two workloads (the first wins).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self
            .node
            .control_plane
            .as_ref()
            .is_some_and(|cp| cp.workload_wait_set)
        {
            out.push(
                "node.control_plane.workload_wait is deprecated and ignored: a pod handed over before its workload is acked at once and fails closed until the workload arrives (docs/model.md)".into(),
            );
        }
        let mut uids = std::collections::HashMap::new();
        let mut ips = std::collections::HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            if let Some(first) = uids.insert(w.uid.0.as_str(), i) {
                uids.insert(w.uid.0.as_str(), first);
                out.push(format!(
                    "workloads[{i}].uid = {:?}: duplicate of workloads[{first}]; using workloads[{first}]",
                    w.uid.0
                ));
                continue;
            }
            for ip in &w.addresses {
                if let Some(first) = ips.insert(*ip, i) {
                    ips.insert(*ip, first);
                    out.push(format!(
                        "workloads[{i}].addresses: {ip} is also workloads[{first}]'s; traffic to it goes to workloads[{first}]"
                    ));
                }
            }
        }
        out
    }

    /// The policies of this file. Broken entries are kept as deny-all over their scope; their
    /// errors are in `PolicySet::errors` (check-config reports them and fails).
    pub fn policy_set(&self) -> crate::policy::PolicySet {
        crate::policy::PolicySet::from_yaml_values(self.policies.clone())
    }

    /// Cross-checks of the waypoint sections: every referenced service and workload exists and
    /// every number is in range.
    fn validate_l7(
        &self,
        invalid: &dyn Fn(String, &dyn fmt::Display, &str) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let services: std::collections::HashSet<String> = self
            .services
            .iter()
            .map(|s| format!("{}/{}", s.namespace, s.hostname))
            .collect();
        let known = |field: String, key: &str| {
            if services.contains(key) {
                Ok(())
            } else {
                Err(invalid(
                    field,
                    &key,
                    "no service has this namespace/hostname",
                ))
            }
        };
        if let Some(w) = &self.waypoint {
            if !self.workloads.iter().any(|x| x.uid.0 == w.workload) {
                return Err(invalid(
                    "waypoint.workload".into(),
                    &w.workload,
                    "no workload has this uid",
                ));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            known(format!("routes[{i}].service"), &r.service)?;
            for (j, rule) in r.rules.iter().enumerate() {
                let at = |f: &str| format!("routes[{i}].rules[{j}].{f}");
                for (k, b) in rule.backends.iter().enumerate() {
                    known(at(&format!("backends[{k}].service")), &b.service)?;
                }
                if !rule.backends.is_empty() && rule.backends.iter().all(|b| b.weight == 0) {
                    return Err(invalid(
                        at("backends"),
                        &"all weights 0",
                        "at least one backend needs a weight above 0",
                    ));
                }
                if let Some(f) = &rule.fault {
                    let pct = |p: f64, field: &str| {
                        if (0.0..=100.0).contains(&p) {
                            Ok(())
                        } else {
                            Err(invalid(at(field), &p, "a percentage is between 0 and 100"))
                        }
                    };
                    if let Some(d) = &f.delay {
                        pct(d.percent, "fault.delay.percent")?;
                    }
                    if let Some(a) = &f.abort {
                        pct(a.percent, "fault.abort.percent")?;
                        if !(200..=599).contains(&a.status) {
                            return Err(invalid(
                                at("fault.abort.status"),
                                &a.status,
                                "an HTTP status is 200-599",
                            ));
                        }
                    }
                }
                if let Some(r) = &rule.redirect {
                    if !(300..=399).contains(&r.status) {
                        return Err(invalid(
                            at("redirect.status"),
                            &r.status,
                            "a redirect status is 3xx",
                        ));
                    }
                }
            }
        }
        for (i, p) in self.http_policies.iter().enumerate() {
            if let Some(s) = &p.service {
                known(format!("http_policies[{i}].service"), s)?;
            }
            for (j, rule) in p.rules.iter().enumerate() {
                for (k, c) in rule.when.iter().enumerate() {
                    crate::waypoint::l7::validate_condition(&c.key).map_err(|reason| {
                        invalid(
                            format!("http_policies[{i}].rules[{j}].when[{k}].key"),
                            &c.key,
                            &reason,
                        )
                    })?;
                }
            }
        }
        for (i, a) in self.request_authentication.iter().enumerate() {
            known(format!("request_authentication[{i}].service"), &a.service)?;
            let jwks = match (&a.jwks, &a.jwks_file) {
                (Some(j), None) => j.clone(),
                // The file is read when the waypoint loads the config, not here.
                (None, Some(_)) => continue,
                _ => {
                    return Err(invalid(
                        format!("request_authentication[{i}]"),
                        &a.name,
                        "needs exactly one of jwks or jwks_file",
                    ))
                }
            };
            crate::waypoint::jwt::Jwks::parse(&jwks).map_err(|reason| {
                invalid(format!("request_authentication[{i}].jwks"), &"...", &reason)
            })?;
        }
        Ok(())
    }

    /// The listen address of one of the node's ports.
    pub fn listen_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.node.bind, port)
    }
}

/// Replaces `${NAME}` with `lookup(NAME)`; returns the first unset NAME as the error. Anything
/// else containing `$` is left as written.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let name_len = after.find('}').filter(|&n| {
            n > 0
                && after[..n]
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        });
        match name_len {
            Some(n) => {
                let name = &after[..n];
                out.push_str(&lookup(name).ok_or_else(|| name.to_string())?);
                rest = &after[n + 1..];
            }
            None => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node:
  name: node-a
  certificates:
    file_ca: { dir: /tmp/ca }
workloads:
  - uid: a
    name: app-a
    namespace: default
    addresses: [10.0.0.1]
    node: node-a
"#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::parse(GOOD, "t.yaml").unwrap();
        assert_eq!(&*c.node.trust_domain, "cluster.local");
        assert_eq!(c.node.ports.hbone, 15008);
        assert_eq!(c.node.ports.outbound, 15001);
        assert_eq!(c.node.inbound_plaintext, InboundPlaintext::Allow);
        assert_eq!(&*c.workloads[0].service_account, "default");
        assert_eq!(c.workloads[0].protocol, TunnelProtocol::Hbone);
        assert!(
            matches!(c.node.certificates, CertificatesConfig::FileCa { ttl, .. } if ttl == DEFAULT_CERT_TTL)
        );
    }

    fn err(text: &str) -> ConfigError {
        Config::parse(text, "t.yaml").unwrap_err()
    }

    #[test]
    fn application_tunnel_is_opt_in_and_strict() {
        assert_eq!(
            Config::parse(GOOD, "t.yaml").unwrap().workloads[0].application_tunnel,
            None
        );
        let with = |t: &str| GOOD.replace("    node: node-a\n", &format!("    node: node-a\n{t}"));
        let c = Config::parse(
            &with("    application_tunnel: { protocol: PROXY, port: 15088 }\n"),
            "t.yaml",
        )
        .unwrap();
        assert_eq!(
            c.workloads[0].application_tunnel,
            Some(ApplicationTunnel {
                protocol: AppTunnelProtocol::Proxy,
                port: 15088
            })
        );
        let e = err(&with("    application_tunnel: { protocol: HAPROXY }\n"));
        assert!(e.to_string().contains("unknown variant `HAPROXY`"), "{e}");
        assert_eq!(e.location().map(|l| l.0), Some(12), "{e}");
        let e = err(&with(
            "    application_tunnel: { protocol: PROXY, port: 70000 }\n",
        ));
        assert!(e.to_string().contains("70000"), "{e}");
        let e = err(&with(
            "    application_tunnel: { protocol: PROXY, version: 1 }\n",
        ));
        assert!(e.to_string().contains("unknown field `version`"), "{e}");
    }

    #[test]
    fn unknown_field_names_file_line_column_and_field() {
        let text = GOOD.replace("    node: node-a\n", "    node: node-a\n    colour: blue\n");
        let e = err(&text);
        let msg = e.to_string();
        assert_eq!(e.location(), Some((12, 5)), "{msg}");
        assert!(msg.starts_with("t.yaml:12:5: "), "{msg}");
        assert!(msg.contains("unknown field `colour`"), "{msg}");
    }

    #[test]
    fn type_errors_name_line_and_value() {
        let e = err(&GOOD.replace("[10.0.0.1]", "[10.0.0.300]"));
        assert_eq!(e.location().map(|l| l.0), Some(10), "{e}");
        assert!(e.to_string().contains("invalid IP address"), "{e}");

        let e = err(&GOOD.replace(
            "file_ca: { dir: /tmp/ca }",
            "file_ca: { dir: /tmp/ca, ttl: 3 days }",
        ));
        assert!(e.to_string().contains("unknown unit"), "{e}");
        assert_eq!(e.location().map(|l| l.0), Some(5), "{e}");

        let e = err(&GOOD.replace(
            "name: node-a\n  cert",
            "name: node-a\n  worker_threads: many\n  cert",
        ));
        assert!(e.to_string().contains("worker_threads"), "{e}");

        // Source preservation is on unless turned off, and only a boolean turns it off.
        assert!(Config::parse(GOOD, "t.yaml").unwrap().node.original_source);
        let off = GOOD.replace(
            "name: node-a\n  cert",
            "name: node-a\n  original_source: false\n  cert",
        );
        assert!(!Config::parse(&off, "t.yaml").unwrap().node.original_source);
        let e = err(&GOOD.replace(
            "name: node-a\n  cert",
            "name: node-a\n  original_source: sometimes\n  cert",
        ));
        assert!(e.to_string().contains("original_source"), "{e}");
    }

    #[test]
    fn workload_groups_need_a_name_an_identity_and_no_twin() {
        let with = |g: &str| format!("{GOOD}workload_groups:\n{g}");
        assert!(Config::parse(
            &with("  - { name: billing, namespace: finance, nodes: [vm-1] }\n"),
            "t"
        )
        .is_ok());
        let e = err(&with("  - { name: billing, namespace: finance }\n"));
        assert!(e.to_string().contains("workload_groups[0].nodes"), "{e}");
        let e = err(&with(
            "  - { name: billing, namespace: finance, nodes: [] }\n",
        ));
        assert!(e.to_string().contains("workload_groups[0].nodes"), "{e}");
        let e = err(&with(
            "  - { name: billing, namespace: finance, nodes: [vm-1, \"*\"] }\n",
        ));
        assert!(e.to_string().contains("workload_groups[0].nodes[1]"), "{e}");
        let e = err(&with(
            "  - { name: billing, namespace: Finance_X, nodes: [vm-1] }\n",
        ));
        assert!(
            e.to_string().contains("workload_groups[0].service_account"),
            "{e}"
        );
        let e = err(&with(
            "  - { name: b, namespace: f, nodes: [v] }\n  - { name: b, namespace: f, nodes: [v] }\n",
        ));
        assert!(e.to_string().contains("duplicate workload group"), "{e}");
        let e = err(&with("  - { name: \"\", namespace: f, nodes: [v] }\n"));
        assert!(e.to_string().contains("workload_groups[0].name"), "{e}");
    }

    #[test]
    fn an_east_west_gateway_names_its_own_local_workload() {
        let with = |gw: &str| {
            GOOD.replace(
                "name: node-a\n  cert",
                &format!("name: node-a\n  east_west_gateway: {gw}\n  cert"),
            )
        };
        let ok = Config::parse(&with("{ workload: a }"), "t.yaml").unwrap();
        let gw = ok.node.east_west_gateway.unwrap();
        assert_eq!(gw.control_plane, None);
        // The control-plane passthrough: a dialable address that is not itself.
        let ok = Config::parse(
            &with("{ workload: a, control_plane: \"10.9.0.1:15012\" }"),
            "t.yaml",
        )
        .unwrap();
        assert_eq!(
            ok.node.east_west_gateway.unwrap().control_plane,
            Some("10.9.0.1:15012".parse().unwrap())
        );
        for (bad, why) in [
            ("127.0.0.1:15012", "pass through to itself"),
            ("0.0.0.0:15012", "not an address to dial"),
            ("10.9.0.1:0", "not an address to dial"),
            ("nope", "node.east_west_gateway"),
        ] {
            let e = err(&with(&format!(
                "{{ workload: a, control_plane: \"{bad}\" }}"
            )));
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        assert_eq!(gw.workload.0, "a");
        assert!(
            gw.exposes("any", "thing.any.svc"),
            "all services by default"
        );
        let e = err(&with("{ workload: nope }"));
        assert!(
            e.to_string().contains("node.east_west_gateway.workload")
                && e.to_string().contains("no workload"),
            "{e}"
        );
        let remote = with("{ workload: a }").replace("    node: node-a\n", "    node: node-b\n");
        let e = err(&remote);
        assert!(e.to_string().contains("must run on this node"), "{e}");
        let e = err(&with("{}"));
        assert!(e.to_string().contains("workload"), "{e}");
        // With a control plane, gateways come from xDS: a file `networks:` is refused.
        let cp = "node:\n  name: n\n  control_plane: { address: https://istiod:15012 }\n  certificates:\n    file_ca: { dir: /tmp/ca }\nnetworks:\n  - { name: b, gateways: [{ address: 10.0.0.9, identity: \"spiffe://cluster.local/ns/x/sa/y\" }] }\n";
        let e = err(cp);
        assert!(e.to_string().contains("networks"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_field_and_value() {
        let dup = format!(
            "{GOOD}  - uid: a\n    name: b\n    namespace: default\n    addresses: [10.0.0.2]\n    node: node-a\n"
        );
        // Duplicates load (reliability #22), with a warning naming both entries.
        let c = Config::parse(&dup, "t.yaml").unwrap();
        assert_eq!(
            c.warnings(),
            ["workloads[1].uid = \"a\": duplicate of workloads[0]; using workloads[0]"]
        );
        let shared_ip = format!(
            "{GOOD}  - uid: c\n    name: c\n    namespace: default\n    addresses: [10.0.0.1]\n    node: node-b\n"
        );
        let c = Config::parse(&shared_ip, "t.yaml").unwrap();
        assert_eq!(
            c.warnings(),
            ["workloads[1].addresses: 10.0.0.1 is also workloads[0]'s; traffic to it goes to workloads[0]"]
        );
        let m = crate::model::Model::from_config(&c);
        assert_eq!(
            m.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap().uid,
            "a"
        );

        let e = err(&GOOD.replace("namespace: default", "namespace: Default")).to_string();
        assert!(
            e.contains("workloads[0].service_account") && e.contains("Default"),
            "{e}"
        );

        let e = err(&GOOD.replace("[10.0.0.1]", "[]")).to_string();
        assert!(e.contains("workloads[0].addresses"), "{e}");
    }

    #[test]
    fn zero_deadlines_are_refused_by_name() {
        for key in [
            "handshake_timeout",
            "connect_timeout",
            "ping_interval",
            "ping_timeout",
        ] {
            let text = GOOD.replace(
                "  name: node-a\n",
                &format!("  name: node-a\n  {key}: 0s\n"),
            );
            let e = err(&text).to_string();
            assert!(e.contains(&format!("node.{key}")), "{e}");
        }
    }

    #[test]
    fn bad_yaml_and_oversized_strings_are_refused() {
        assert!(err("node: [").location().is_some());
        let huge = GOOD.replace("name: app-a", &format!("name: {}", "x".repeat(5000)));
        assert!(err(&huge).to_string().contains("limit"));
        // Deep nesting must be an error, not a stack overflow (reliability #24).
        let deep = format!("node: {}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(Config::parse(&deep, "t.yaml").is_err());
    }

    /// Parses `text`, asserting it is refused well under a second, and returns the error.
    fn refused_quickly(text: &str) -> ConfigError {
        let started = std::time::Instant::now();
        let e = err(text);
        let took = started.elapsed();
        // Generous for an unoptimized test build on a loaded CI machine; main took 4 s to 23 s
        // on these inputs.
        assert!(took < Duration::from_millis(500), "{took:?}: {e}");
        e
    }

    #[test]
    fn deep_nesting_is_refused_in_linear_time_at_its_position() {
        // Reliability #40, in the places an attacker can nest: node settings (typed), the raw
        // `policies` list, and the waypoint's sections; in flow and block style.
        let policies = |nest: &str| format!("{GOOD}policies:\n  - name: p\n    x: {nest}\n");
        for n in [10_000, 100_000] {
            let flow = format!("{}{}", "[".repeat(n), "]".repeat(n));
            let maps = format!("{}1{}", "{a: ".repeat(n), "}".repeat(n));
            let block = format!("\n      {}x", "- ".repeat(n));
            for (text, line) in [
                (format!("node: {flow}\n"), 1),
                (format!("node: {maps}\n"), 1),
                (policies(&flow), 14),
                (policies(&maps), 14),
                (policies(&block), 15),
                (
                    GOOD.replace(
                        "    node: node-a",
                        &format!("    node: node-a\n    l: {flow}"),
                    ),
                    12,
                ),
                (
                    format!("{GOOD}routes: [{{name: r, service: s, rules: {flow}}}]\n"),
                    12,
                ),
            ] {
                let e = refused_quickly(&text);
                let msg = e.to_string();
                assert!(msg.contains("nesting deeper than 64 levels"), "{msg}");
                assert_eq!(e.location().map(|l| l.0), Some(line), "{msg}");
                assert!(msg.starts_with(&format!("t.yaml:{line}:")), "{msg}");
            }
        }
        // At the limit the file is still read (and judged by the schema as before).
        let ok = format!(
            "{GOOD}policies:\n  - name: p\n    x: {}1{}\n",
            "[".repeat(60),
            "]".repeat(60)
        );
        assert!(Config::parse(&ok, "t.yaml").is_ok());
    }

    #[test]
    fn aliases_cannot_expand() {
        // The billion laughs: nine levels of nine aliases each (387 million nodes expanded).
        let mut bomb = format!("{GOOD}policies:\n  - name: p\n    l0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 9].join(", ");
            bomb.push_str(&format!("    l{i}: &a{i} [{refs}]\n"));
        }
        let e = refused_quickly(&bomb);
        assert_eq!(e.location(), Some((14, 9)), "{e}");
        assert!(
            e.to_string()
                .contains("anchors and aliases are not accepted"),
            "{e}"
        );
        // A lone alias, in a typed section.
        let e = refused_quickly(&GOOD.replace("name: node-a", "name: *n"));
        assert_eq!(e.location(), Some((3, 9)), "{e}");
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let big = format!("{GOOD}# {}\n", "x".repeat(guard::MAX_BYTES));
        let e = refused_quickly(&big);
        assert!(matches!(e, ConfigError::TooLarge { .. }), "{e}");
        assert!(
            e.to_string().contains("over the 16777216-byte limit"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.yaml");
        std::fs::write(&path, &big).unwrap();
        let e = Config::load(&path).unwrap_err();
        assert!(matches!(e, ConfigError::TooLarge { .. }), "{e}");
        // A file with no end is read no further than the limit.
        let e = Config::load(Path::new("/dev/zero")).unwrap_err();
        assert!(matches!(e, ConfigError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("24").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("1d").is_err());
    }

    #[test]
    fn environment_references_expand_and_unset_ones_are_named() {
        let env = |k: &str| match k {
            "NODE_NAME" => Some("worker-3".to_string()),
            "POD_IP" => Some("10.1.2.3".to_string()),
            _ => None,
        };
        assert_eq!(
            expand_env("name: ${NODE_NAME}\naddr: [${POD_IP}]\n", env).unwrap(),
            "name: worker-3\naddr: [10.1.2.3]\n"
        );
        assert_eq!(expand_env("a: ${MISSING}", env), Err("MISSING".to_string()));
        // Not a reference: lower case, empty, unterminated, a lone `$`.
        for text in ["${lower}", "${}", "${OPEN", "cost: $5"] {
            assert_eq!(expand_env(text, env).unwrap(), text);
        }
    }
}
