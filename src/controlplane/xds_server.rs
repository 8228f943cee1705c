//! A standalone xDS server: serves the workloads, services and L4 policies of a mesh file to node
//! tunnels over Envoy's delta ADS stream, the way istiod serves ztunnel, so a mesh without istiod
//! can still feed its nodes from one place (docs/model.md "Control plane").
//!
//! Two halves:
//! - [`resources`] turns a [`Config`] into Istio's resources (`istio.workload.Address` named by
//!   workload uid or `namespace/hostname`, `istio.security.Authorization` named
//!   `namespace/name`), each versioned by a hash of its encoding, so a reload that leaves a
//!   resource alone leaves its version alone and it is not sent again. The field mapping follows
//!   Istio's meaning of each field, because the node's xDS client reads these as it reads
//!   istiod's.
//! - [`StreamState`] is the delta protocol of one stream as a pure state machine (request in,
//!   responses out; a new snapshot in, deltas out); [`XdsServer`] only moves messages between it,
//!   the gRPC stream and the config watch.
//!
//! Bounds, since the peer is only authenticated by the transport (if at all): a request is at
//! most [`MAX_REQUEST_BYTES`]; a stream keeps the shared snapshot and a few flags, never what
//! the client claims to hold (that is only read to answer its first request); responses wait in
//! a queue of [`OUTBOX`], so a client that does not read stops being read; at most
//! [`MAX_STREAMS`] streams are open at once, however many connections carry them, and one that
//! sends nothing is closed after [`FIRST_REQUEST_TIMEOUT`]. A type URL
//! this server does not serve ends the stream with `InvalidArgument`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{mpsc, watch, Semaphore};
use zmesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use zmesh_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use zmesh_proto::istio::security as sec;
use zmesh_proto::istio::workload as wl;
use zmesh_proto::prost::Message;
use zmesh_proto::prost_types::Any;
use zmesh_proto::tonic::{self, Request, Response, Status, Streaming};
use zmesh_proto::type_url;

use crate::config::{
    AppTunnelProtocol, Config, HealthStatus, LoadBalancingMode, RoutingScope, ServiceConfig,
    TunnelProtocol, WorkloadConfig,
};
use crate::policy::{self, AuthorizationPolicy, PolicyEntry};

/// Largest request accepted on a stream. A node's requests are small (a subscription, an ACK);
/// the largest is the first one of a type after a reconnect, which lists every resource the node
/// holds: 4 MiB covers ~50 000 names with their versions, and is tonic's default.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Responses queued for one stream before the server stops reading that stream's requests: a
/// node that does not read its responses cannot make the server buffer more than this.
pub const OUTBOX: usize = 4;
/// Names accepted in one request's `resource_names_subscribe`. A node subscribes with the
/// wildcard; on-demand lookups name a handful of addresses.
pub const MAX_SUBSCRIBE_NAMES: usize = 10_000;
/// Hex digits of the SHA-256 of a resource's encoding used as its version: 64 bits, so two
/// different encodings of one resource name do not share a version in practice.
const VERSION_HEX: usize = 16;
/// The HBONE port a waypoint is reached on. Istio's waypoints listen on 15008 whatever the
/// node's own settings, and istiod always sends this value.
pub const WAYPOINT_HBONE_PORT: u32 = 15008;
/// Streams open at once on one server (a node tunnel keeps one). Beyond it a new stream is
/// refused with `ResourceExhausted`, so HTTP/2's many streams per connection cannot multiply
/// the server's work without bound.
pub const MAX_STREAMS: usize = 4096;
/// How long a new stream may stay silent before its first request. A node sends it at once; a
/// stream that sends nothing only holds one of the [`MAX_STREAMS`] slots.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A NACK's message is the client's text: at most this much of it is logged.
const MAX_LOGGED_ERROR: usize = 512;

/// The resource types served, in the order of [`Snapshot::of`] and [`StreamState`]'s slots.
pub const TYPES: [&str; 2] = [type_url::ADDRESS, type_url::AUTHORIZATION];

/// One resource as served: its encoding wrapped in `Any`, and its version.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub version: String,
    pub resource: Any,
}

impl Versioned {
    fn new(type_url: &str, message: &impl Message) -> Versioned {
        let value = message.encode_to_vec();
        let digest = ring::digest::digest(&ring::digest::SHA256, &value);
        let mut version = String::with_capacity(VERSION_HEX);
        for b in &digest.as_ref()[..VERSION_HEX / 2] {
            let _ = write!(version, "{b:02x}");
        }
        Versioned {
            version,
            resource: Any {
                type_url: type_url.to_string(),
                value,
            },
        }
    }
}

/// Every resource of one config, by type and name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// `istio.workload.Address`: workloads by uid, services by `namespace/hostname`.
    pub addresses: BTreeMap<String, Versioned>,
    /// `istio.security.Authorization` by `namespace/name`.
    pub authorizations: BTreeMap<String, Versioned>,
}

impl Snapshot {
    /// The resources of type slot `i` (an index into [`TYPES`]).
    fn of(&self, i: usize) -> &BTreeMap<String, Versioned> {
        match i {
            0 => &self.addresses,
            _ => &self.authorizations,
        }
    }
}

/// Converts the mesh file into the resources a node tunnel receives from istiod.
///
/// The mapping, file → Istio (what the node's xDS client must invert):
/// - workload: `uid`, `name`, `namespace`, `service_account`, `node` as such; `addresses` as 4 or
///   16 bytes; `protocol` HBONE → `HBONE`, TCP → `NONE`; `trust_domain` always set (the node's
///   when the entry has none); `canonical_name`/`canonical_revision` always set (defaults: the
///   name, `latest`); `workload_type` deployment/pod/job/cronjob → the enum, any other kind →
///   `DEPLOYMENT` (what the node's baggage does with it); `workload_name` = `name`; `status`;
///   `capacity` always set (0 included); `locality` only when some part is set; `services`
///   `namespace/hostname` → `PortList` (an empty map is an empty list); `waypoint` (a uid) →
///   `GatewayAddress{address: first IP of that workload, hbone_mtls_port: 15008}`;
///   `authorization_policies` = `namespace/name` of the workload-selector policies of its
///   namespace that list its `name`; `cluster_id` = this file's `node.cluster`.
/// - service: `name`, `namespace`, `hostname`; `vips` → `addresses` (no network); `ports`;
///   `subject_alt_names` as full SPIFFE URIs; `waypoint` as for workloads; `load_balancing` only
///   when not the default (standard → `UNSPECIFIED_MODE`, strict, failover; routing preference
///   in order); `ip_families` from the VIPs; `canonical`. Not representable, so not served:
///   `traffic_policy`, `app_protocols`.
/// - policy: `name`, `namespace`, `scope` (global, namespace, workload selector: the names go
///   on the workloads), `action`, `dry_run`; principals without `spiffe://`; `*` → `presence`,
///   `x*` → `prefix`, `*x` → `suffix`, else `exact`; CIDRs as address bytes and prefix length;
///   `service_accounts` as namespace and name; ports.
///
/// The deny-all a broken policy is enforced as. Unknown parts: the name `broken-<index>`; the
/// namespace istio's root namespace with a global scope.
fn deny_all(index: usize, b: policy::BrokenPolicy) -> AuthorizationPolicy {
    let scope = match (&b.namespace, b.scope) {
        (None, _) => policy::Scope::Global,
        (Some(_), Some(s)) => s,
        (Some(_), None) => policy::Scope::Namespace,
    };
    AuthorizationPolicy {
        name: b.name.unwrap_or_else(|| format!("broken-{index}")),
        namespace: b.namespace.unwrap_or_else(|| "istio-system".into()),
        scope,
        action: policy::Action::Deny,
        dry_run: false,
        rules: vec![policy::Rule { clauses: vec![] }],
    }
}

/// A broken policy (`PolicyEntry::Broken`) is served as what a node reading the file enforces:
/// a DENY of everything (one rule without clauses) over what could be read of its scope (the
/// whole mesh when its namespace is unknown), logged; `check-config` names the error. A typo in
/// a DENY never opens what it meant to close.
///
/// A second policy of one `namespace/name` is served as `namespace/name#2` (both enforced, as
/// in file mode). Not served, each logged: a workload whose uid was already used (the first
/// wins, as in `Model::from_config`) and a service whose `namespace/hostname` equals a workload
/// uid.
pub fn resources(cfg: &Config) -> Snapshot {
    let policies: Vec<AuthorizationPolicy> = PolicyEntry::from_yaml_values(cfg.policies.clone())
        .into_iter()
        .enumerate()
        .map(|(i, p)| match p {
            PolicyEntry::Valid(p) => p,
            PolicyEntry::Broken(b) => {
                tracing::warn!(error = %b.error, "xDS server: broken policy served as deny-all over its scope");
                deny_all(i, b)
            }
        })
        .collect();
    let mut out = Snapshot::default();
    for p in &policies {
        let mut key = format!("{}/{}", p.namespace, p.name);
        // A file node enforces both of two policies with one name: so do the nodes fed here,
        // the second under a resource name of its own (a DENY is never dropped).
        let mut n = 1;
        while out.authorizations.contains_key(&key) {
            n += 1;
            key = format!("{}/{}#{n}", p.namespace, p.name);
        }
        if n > 1 {
            tracing::warn!(policy = %key, "xDS server: duplicate policy name; served under a numbered resource name");
        }
        let v = Versioned::new(type_url::AUTHORIZATION, &to_authorization(p));
        out.authorizations.insert(key, v);
    }

    // Workload-selector policies are found from the workload side in Istio: each workload lists
    // the `namespace/name` of the policies selecting it.
    let mut selecting: HashMap<(&str, &str), Vec<String>> = HashMap::new();
    for p in &policies {
        if let policy::Scope::WorkloadSelector { workloads } = &p.scope {
            let key = format!("{}/{}", p.namespace, p.name);
            for name in workloads {
                let keys = selecting
                    .entry((p.namespace.as_str(), name.as_str()))
                    .or_default();
                if !keys.contains(&key) {
                    keys.push(key.clone());
                }
            }
        }
    }
    let mut first_ip: HashMap<&str, IpAddr> = HashMap::new();
    for w in &cfg.workloads {
        if let Some(ip) = w.addresses.first() {
            first_ip.entry(w.uid.0.as_str()).or_insert(*ip);
        }
    }
    let waypoint = |uid: &Option<crate::config::BoundedString>| {
        let ip = first_ip.get(uid.as_ref()?.0.as_str())?;
        Some(gateway(*ip))
    };

    for w in &cfg.workloads {
        if out.addresses.contains_key(&w.uid.0) {
            tracing::warn!(uid = %w.uid, "xDS server: duplicate workload uid; serving the first");
            continue;
        }
        let mut workload = to_workload(cfg, w);
        workload.waypoint = waypoint(&w.waypoint);
        workload.authorization_policies = selecting
            .get(&(w.namespace.0.as_str(), w.name.0.as_str()))
            .cloned()
            .unwrap_or_default();
        let address = wl::Address {
            r#type: Some(wl::address::Type::Workload(workload)),
        };
        let v = Versioned::new(type_url::ADDRESS, &address);
        out.addresses.insert(w.uid.0.clone(), v);
    }
    for s in &cfg.services {
        let key = format!("{}/{}", s.namespace, s.hostname);
        if out.addresses.contains_key(&key) {
            tracing::warn!(service = %key, "xDS server: a workload uid equals this service's namespace/hostname; serving the workload");
            continue;
        }
        let mut service = to_service(s);
        service.waypoint = waypoint(&s.waypoint);
        let address = wl::Address {
            r#type: Some(wl::address::Type::Service(service)),
        };
        out.addresses
            .insert(key, Versioned::new(type_url::ADDRESS, &address));
    }
    out
}

/// 4 bytes for IPv4, 16 for IPv6, as Istio encodes addresses.
fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn gateway(ip: IpAddr) -> wl::GatewayAddress {
    wl::GatewayAddress {
        destination: Some(wl::gateway_address::Destination::Address(
            wl::NetworkAddress {
                network: String::new(),
                address: ip_bytes(ip),
            },
        )),
        hbone_mtls_port: WAYPOINT_HBONE_PORT,
    }
}

fn ports(map: &BTreeMap<u16, u16>) -> Vec<wl::Port> {
    map.iter()
        .map(|(s, t)| wl::Port {
            service_port: u32::from(*s),
            target_port: u32::from(*t),
        })
        .collect()
}

/// A workload as istiod describes a pod. Defaults the file leaves implicit are written out as
/// the node would apply them (trust domain, canonical name and revision), so the client does
/// not depend on this server's `node` section. The waypoint and the selecting policies are
/// filled in by [`resources`], which knows the other entries.
fn to_workload(cfg: &Config, w: &WorkloadConfig) -> wl::Workload {
    let network = w.network.as_ref().unwrap_or(&cfg.node.network).0.as_str();
    let (workload_type, known) = match w.workload_type.0.as_str() {
        "deployment" => (wl::WorkloadType::Deployment, true),
        "pod" => (wl::WorkloadType::Pod, true),
        "job" => (wl::WorkloadType::Job, true),
        "cronjob" => (wl::WorkloadType::Cronjob, true),
        // Istio has no other kinds; the node's baggage treats any other kind as a deployment.
        _ => (wl::WorkloadType::Deployment, false),
    };
    if !known {
        tracing::debug!(uid = %w.uid, kind = %w.workload_type, "xDS server: workload type has no Istio value; sent as DEPLOYMENT");
    }
    let locality = (!w.locality.region.is_empty()
        || !w.locality.zone.is_empty()
        || !w.locality.subzone.is_empty())
    .then(|| wl::Locality {
        region: w.locality.region.0.clone(),
        zone: w.locality.zone.0.clone(),
        subzone: w.locality.subzone.0.clone(),
    });
    wl::Workload {
        uid: w.uid.0.clone(),
        name: w.name.0.clone(),
        namespace: w.namespace.0.clone(),
        addresses: w.addresses.iter().map(|ip| ip_bytes(*ip)).collect(),
        tunnel_protocol: match w.protocol {
            TunnelProtocol::Hbone => wl::TunnelProtocol::Hbone,
            TunnelProtocol::Tcp => wl::TunnelProtocol::None,
        } as i32,
        trust_domain: w
            .trust_domain
            .as_ref()
            .unwrap_or(&cfg.node.trust_domain)
            .0
            .clone(),
        service_account: w.service_account.0.clone(),
        node: w.node.0.clone(),
        canonical_name: w.canonical_name().to_string(),
        canonical_revision: w.canonical_revision().to_string(),
        workload_type: workload_type as i32,
        // The controller's name: zmesh workloads carry one name, used for both.
        workload_name: w.name.0.clone(),
        services: w
            .services
            .iter()
            .map(|(k, m)| (k.0.clone(), wl::PortList { ports: ports(m) }))
            .collect(),
        status: match w.status {
            HealthStatus::Healthy => wl::WorkloadStatus::Healthy,
            HealthStatus::Unhealthy => wl::WorkloadStatus::Unhealthy,
        } as i32,
        cluster_id: cfg.node.cluster.0.clone(),
        locality,
        capacity: Some(w.capacity),
        application_tunnel: w.application_tunnel.map(|t| wl::ApplicationTunnel {
            protocol: match t.protocol {
                AppTunnelProtocol::None => wl::application_tunnel::Protocol::None,
                AppTunnelProtocol::Proxy => wl::application_tunnel::Protocol::Proxy,
            } as i32,
            port: u32::from(t.port),
        }),
        network: network.to_string(),
        // As istiod does for a multi-network mesh: the gateway its network is reached through
        // (the first the file names; clients resolve it to the workload at that address).
        network_gateway: cfg
            .networks
            .iter()
            .find(|n| n.name.0 == network)
            .and_then(|n| n.gateways.first())
            .map(|g| wl::GatewayAddress {
                destination: Some(wl::gateway_address::Destination::Address(
                    wl::NetworkAddress {
                        network: network.to_string(),
                        address: ip_bytes(g.address),
                    },
                )),
                hbone_mtls_port: u32::from(g.port),
            }),
        ..Default::default()
    }
}

/// A service as istiod describes a Kubernetes Service. Its waypoint is filled in by
/// [`resources`]. `traffic_policy` and `app_protocols` have no field in Istio's `Service`
/// (istiod sends them to waypoints in other resources) and are not served.
fn to_service(s: &ServiceConfig) -> wl::Service {
    let v4 = s.vips.iter().any(IpAddr::is_ipv4);
    let v6 = s.vips.iter().any(IpAddr::is_ipv6);
    let ip_families = match (v4, v6) {
        (true, true) => wl::IpFamilies::Dual,
        (true, false) => wl::IpFamilies::Ipv4Only,
        (false, true) => wl::IpFamilies::Ipv6Only,
        (false, false) => wl::IpFamilies::Automatic,
    };
    let lb = &s.load_balancing;
    let load_balancing = (lb.mode != LoadBalancingMode::Standard
        || !lb.routing_preference.is_empty())
    .then(|| wl::LoadBalancing {
        routing_preference: lb
            .routing_preference
            .iter()
            .map(|r| {
                (match r {
                    RoutingScope::Region => wl::load_balancing::Scope::Region,
                    RoutingScope::Zone => wl::load_balancing::Scope::Zone,
                    RoutingScope::Subzone => wl::load_balancing::Scope::Subzone,
                    RoutingScope::Node => wl::load_balancing::Scope::Node,
                    RoutingScope::Cluster => wl::load_balancing::Scope::Cluster,
                }) as i32
            })
            .collect(),
        mode: (match lb.mode {
            // Istio's unset mode is ztunnel's "standard": prefer closer, fall back to any.
            LoadBalancingMode::Standard => wl::load_balancing::Mode::UnspecifiedMode,
            LoadBalancingMode::Strict => wl::load_balancing::Mode::Strict,
            LoadBalancingMode::Failover => wl::load_balancing::Mode::Failover,
        }) as i32,
        health_policy: wl::load_balancing::HealthPolicy::OnlyHealthy as i32,
    });
    wl::Service {
        name: s.name.0.clone(),
        namespace: s.namespace.0.clone(),
        hostname: s.hostname.0.clone(),
        addresses: s
            .vips
            .iter()
            .map(|ip| wl::NetworkAddress {
                network: String::new(),
                address: ip_bytes(*ip),
            })
            .collect(),
        ports: ports(&s.ports),
        // Full SPIFFE URIs, as istiod sends them (ztunnel parses each as an identity); only
        // authorization principals go without the scheme.
        subject_alt_names: s
            .subject_alt_names
            .iter()
            .map(|x| x.0.to_string())
            .collect(),
        load_balancing,
        ip_families: ip_families as i32,
        // The file's services are definitions, as Kubernetes Services are for istiod (not
        // ServiceEntries that may share a hostname).
        canonical: true,
        ..Default::default()
    }
}

/// A policy as istiod sends it to ztunnel: principals without `spiffe://` (the policy module
/// already keeps them so), CIDRs as address bytes and prefix length.
fn to_authorization(p: &AuthorizationPolicy) -> sec::Authorization {
    let strings = |v: &[policy::StringMatch]| -> Vec<sec::StringMatch> {
        v.iter()
            .map(|m| sec::StringMatch {
                match_type: Some(match m {
                    policy::StringMatch::Exact(s) => sec::string_match::MatchType::Exact(s.clone()),
                    policy::StringMatch::Prefix(s) => {
                        sec::string_match::MatchType::Prefix(s.clone())
                    }
                    policy::StringMatch::Suffix(s) => {
                        sec::string_match::MatchType::Suffix(s.clone())
                    }
                    policy::StringMatch::Presence => sec::string_match::MatchType::Presence(()),
                }),
            })
            .collect()
    };
    let nets = |v: &[ipnet::IpNet]| -> Vec<sec::Address> {
        v.iter()
            .map(|n| sec::Address {
                address: ip_bytes(n.addr()),
                length: u32::from(n.prefix_len()),
            })
            .collect()
    };
    let sas = |v: &[policy::ServiceAccountMatch]| -> Vec<sec::ServiceAccountMatch> {
        v.iter()
            .map(|s| sec::ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    let port_list = |v: &[u16]| v.iter().map(|p| u32::from(*p)).collect::<Vec<u32>>();
    sec::Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: (match p.scope {
            policy::Scope::Global => sec::Scope::Global,
            policy::Scope::Namespace => sec::Scope::Namespace,
            policy::Scope::WorkloadSelector { .. } | policy::Scope::Workloads(_) => {
                sec::Scope::WorkloadSelector
            }
        }) as i32,
        action: (match p.action {
            policy::Action::Allow => sec::Action::Allow,
            policy::Action::Deny => sec::Action::Deny,
        }) as i32,
        dry_run: p.dry_run,
        rules: p
            .rules
            .iter()
            .map(|r| sec::Rule {
                clauses: r
                    .clauses
                    .iter()
                    .map(|c| sec::Clause {
                        matches: c
                            .matches
                            .iter()
                            .map(|m| sec::Match {
                                namespaces: strings(&m.namespaces),
                                not_namespaces: strings(&m.not_namespaces),
                                principals: strings(&m.principals),
                                not_principals: strings(&m.not_principals),
                                source_ips: nets(&m.source_ips),
                                not_source_ips: nets(&m.not_source_ips),
                                destination_ips: nets(&m.destination_ips),
                                not_destination_ips: nets(&m.not_destination_ips),
                                destination_ports: port_list(&m.destination_ports),
                                not_destination_ports: port_list(&m.not_destination_ports),
                                service_accounts: sas(&m.service_accounts),
                                not_service_accounts: sas(&m.not_service_accounts),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

// ---- The delta protocol of one stream ----

/// A request this server refuses; the stream ends with it as `InvalidArgument`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("type URL {0:?} is not served here (this xDS server serves type.googleapis.com/istio.workload.Address and type.googleapis.com/istio.security.Authorization)")]
    UnknownType(String),
    #[error("{0} names in resource_names_subscribe; at most {MAX_SUBSCRIBE_NAMES} are accepted in one request")]
    TooManyNames(usize),
}

/// What the stream knows about one resource type.
#[derive(Debug, Default)]
struct TypeState {
    /// The first request of this type arrived (and was answered). From then on the client
    /// holds every resource of the type at the version of [`StreamState::snapshot`]: each
    /// response brings it there, so the stream keeps no per-resource state of its own.
    subscribed: bool,
    /// Nonce of the last response of this type; an ACK naming another one is stale.
    last_nonce: String,
    /// A NACK of `last_nonce` was logged: repeats are not, so a client cannot flood the log.
    nack_logged: bool,
}

/// The delta xDS protocol of one stream, without I/O: feed it requests and snapshots, send
/// what it returns. Every subscription is a wildcard one (istiod's behaviour for ztunnel): the
/// client gets every resource of the type, then deltas as the mesh changes; unsubscribing a name
/// changes nothing. As istiod, it does not hold a push back until the previous response of the
/// type is ACKed: each response is a delta against what the client was last sent, so they apply
/// in order, and the queue to the client is bounded ([`OUTBOX`]).
#[derive(Debug)]
pub struct StreamState {
    snapshot: Arc<Snapshot>,
    types: [TypeState; 2],
    /// Makes nonces unique across streams, so a nonce from an old stream is never mistaken.
    stream_tag: u32,
    sent: u64,
}

impl StreamState {
    pub fn new(snapshot: Arc<Snapshot>) -> StreamState {
        StreamState {
            snapshot,
            types: Default::default(),
            stream_tag: rand::random(),
            sent: 0,
        }
    }

    fn response(
        &mut self,
        i: usize,
        resources: Vec<Resource>,
        removed: Vec<String>,
    ) -> DeltaDiscoveryResponse {
        self.sent += 1;
        let nonce = format!("{:08x}-{}", self.stream_tag, self.sent);
        self.types[i].last_nonce.clone_from(&nonce);
        self.types[i].nack_logged = false;
        DeltaDiscoveryResponse {
            system_version_info: String::new(),
            resources,
            type_url: TYPES[i].to_string(),
            nonce,
            removed_resources: removed,
        }
    }

    /// One request from the client: the answer to send, if any. An `Err` ends the stream (as
    /// `InvalidArgument`, with the error's text).
    pub fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
    ) -> Result<Option<DeltaDiscoveryResponse>, ProtocolError> {
        let i = TYPES
            .iter()
            .position(|t| *t == req.type_url)
            .ok_or_else(|| ProtocolError::UnknownType(truncate(&req.type_url).to_string()))?;
        if req.resource_names_subscribe.len() > MAX_SUBSCRIBE_NAMES {
            return Err(ProtocolError::TooManyNames(
                req.resource_names_subscribe.len(),
            ));
        }
        let state = &mut self.types[i];
        if !req.response_nonce.is_empty() {
            let current = req.response_nonce == state.last_nonce;
            match &req.error_detail {
                // A NACK: the client kept what it had. Resending the same resources would be
                // refused again, so the next change of each resource is what repairs it.
                Some(e) if current && !state.nack_logged => {
                    state.nack_logged = true;
                    tracing::warn!(
                        type_url = TYPES[i],
                        nonce = %req.response_nonce,
                        code = e.code,
                        error = %truncate(&e.message),
                        "xDS client rejected a response (NACK)"
                    )
                }
                Some(_) => {
                    tracing::debug!(type_url = TYPES[i], nonce = %truncate(&req.response_nonce), "NACK of an earlier response, or one already logged")
                }
                None if current => {
                    tracing::debug!(type_url = TYPES[i], nonce = %req.response_nonce, "ACK")
                }
                None => {
                    tracing::debug!(type_url = TYPES[i], nonce = %truncate(&req.response_nonce), "stale ACK")
                }
            }
        }
        let snapshot = self.snapshot.clone();
        let current = snapshot.of(i);
        if !state.subscribed {
            // The first request of the type: everything the client lacks at the current
            // version, and the names it holds that no longer exist. Always answered, so the
            // client knows it is in sync even when the type is empty.
            state.subscribed = true;
            let initial = &req.initial_resource_versions;
            let resources = current
                .iter()
                .filter(|(name, v)| initial.get(*name) != Some(&v.version))
                .map(|(name, v)| resource(name, v))
                .collect();
            let mut removed: Vec<String> = initial
                .keys()
                .filter(|name| !current.contains_key(*name))
                .cloned()
                .collect();
            // The client's map has no order; the answer does.
            removed.sort_unstable();
            return Ok(Some(self.response(i, resources, removed)));
        }
        // A later subscription names resources explicitly (an on-demand lookup). The client
        // already holds every existing one at its current version; a name that does not exist
        // is answered as removed, as the protocol asks, so the client stops waiting for it.
        let mut removed: Vec<String> = req
            .resource_names_subscribe
            .iter()
            .filter(|name| *name != "*" && !current.contains_key(*name))
            .cloned()
            .collect();
        removed.sort_unstable();
        removed.dedup();
        if removed.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.response(i, Vec::new(), removed)))
    }

    /// A new mesh snapshot: per subscribed type, the resources that changed or appeared and the
    /// names that went away. Types with no change get no response.
    pub fn on_snapshot(&mut self, snapshot: Arc<Snapshot>) -> Vec<DeltaDiscoveryResponse> {
        let previous = std::mem::replace(&mut self.snapshot, snapshot.clone());
        let mut out = Vec::new();
        for i in 0..TYPES.len() {
            if !self.types[i].subscribed {
                continue;
            }
            let (held, current) = (previous.of(i), snapshot.of(i));
            let resources: Vec<Resource> = current
                .iter()
                .filter(|(name, v)| held.get(*name).map(|h| &h.version) != Some(&v.version))
                .map(|(name, v)| resource(name, v))
                .collect();
            let removed: Vec<String> = held
                .keys()
                .filter(|name| !current.contains_key(*name))
                .cloned()
                .collect();
            if resources.is_empty() && removed.is_empty() {
                continue;
            }
            out.push(self.response(i, resources, removed));
        }
        out
    }
}

fn resource(name: &str, v: &Versioned) -> Resource {
    Resource {
        version: v.version.clone(),
        resource: Some(v.resource.clone()),
        name: name.to_string(),
        aliases: Vec::new(),
        ttl: None,
    }
}

/// Client-supplied text for a log line, cut at [`MAX_LOGGED_ERROR`] bytes (on a char boundary).
fn truncate(s: &str) -> &str {
    if s.len() <= MAX_LOGGED_ERROR {
        return s;
    }
    let mut end = MAX_LOGGED_ERROR;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---- The gRPC service ----

/// The snapshot of the latest config and registrations, built once per change however many
/// streams are open.
/// The config and registry generation a snapshot was built from, and the snapshot.
type Built = (Arc<Config>, u64, Arc<Snapshot>);

#[derive(Debug, Default)]
struct SnapshotCache {
    last: Mutex<Option<Built>>,
    registry: Arc<Registry>,
}

impl SnapshotCache {
    fn get(&self, cfg: &Arc<Config>) -> Arc<Snapshot> {
        let generation = *self.registry.generation.borrow();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((c, g, s)) = last.as_ref() {
            if Arc::ptr_eq(c, cfg) && *g == generation {
                return s.clone();
            }
        }
        // Judged again against the file in force: a node the group no longer admits, a group
        // that is gone or an address the file now gives to someone else is withheld from every
        // snapshot, however long the registering stream lives.
        let registered: Vec<_> = self
            .registry
            .workloads()
            .into_iter()
            .filter(|w| still_admitted(cfg, w))
            .collect();
        let snapshot = Arc::new(if registered.is_empty() {
            resources(cfg)
        } else {
            let mut merged = (**cfg).clone();
            merged.workloads.extend(registered);
            resources(&merged)
        });
        *last = Some((cfg.clone(), generation, snapshot.clone()));
        snapshot
    }
}

/// The node a stream's bearer token belongs to, put in the request by the token check.
#[derive(Debug, Clone)]
pub struct CallerNode(pub String);

/// VMs auto-registered from `workload_groups` by their open xDS streams (Istio's
/// auto-registered WorkloadEntries): one is added when a stream's first request names a group
/// in its metadata (`AUTO_REGISTER_GROUP`), on the node the stream's token belongs to, and is
/// gone when that stream ends.
#[derive(Debug)]
pub struct Registry {
    entries: Mutex<BTreeMap<String, (u64, crate::config::WorkloadConfig)>>,
    generation: watch::Sender<u64>,
    next: std::sync::atomic::AtomicU64,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            entries: Mutex::default(),
            generation: watch::channel(0).0,
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }
}

impl Registry {
    fn workloads(&self) -> Vec<crate::config::WorkloadConfig> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.values().map(|(_, w)| w.clone()).collect()
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Registers `w` (replacing the same uid's earlier registration: a reconnect); dropping the
    /// returned guard takes it away, unless a newer registration replaced it meanwhile. Refused
    /// (None, with the uid that holds it) when another registration holds one of its addresses:
    /// checked and inserted under one lock, so two VMs racing for an address cannot both win.
    fn add(self: &Arc<Self>, w: crate::config::WorkloadConfig) -> Result<Registration, String> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let uid = w.uid.0.clone();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((holder, _)) = entries
            .iter()
            .find(|(u, (_, o))| **u != uid && o.addresses.iter().any(|a| w.addresses.contains(a)))
        {
            return Err(holder.clone());
        }
        let changed = entries.get(&uid).is_none_or(|(_, old)| {
            (
                &old.name,
                &old.addresses,
                &old.service_account,
                &old.network,
                &old.services,
            ) != (
                &w.name,
                &w.addresses,
                &w.service_account,
                &w.network,
                &w.services,
            )
        });
        entries.insert(uid.clone(), (id, w));
        drop(entries);
        // A reconnect that registers the same workload again changes no snapshot.
        if changed {
            self.bump();
        }
        Ok(Registration {
            registry: self.clone(),
            uid,
            id,
        })
    }
}

/// An auto-registration held by its stream.
struct Registration {
    registry: Arc<Registry>,
    uid: String,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut entries = self
            .registry
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if entries.get(&self.uid).is_some_and(|(id, _)| *id == self.id) {
            entries.remove(&self.uid);
            drop(entries);
            tracing::info!(uid = %self.uid, "auto-registered workload removed: its xDS stream ended");
            self.registry.bump();
        }
    }
}

/// The registration a stream's first request asks for: `AUTO_REGISTER_GROUP` names a group of
/// `cfg` (in `NAMESPACE` when that is set), the workload runs on the token's node at the first
/// of `INSTANCE_IPS` (else the stream's peer address). None without a group, a known group or
/// an authenticated node (fail closed: nothing is registered).
fn auto_registration(
    cfg: &Config,
    req: &DeltaDiscoveryRequest,
    caller: Option<&CallerNode>,
    peer_ip: Option<IpAddr>,
) -> Option<crate::config::WorkloadConfig> {
    let fields = &req.node.as_ref()?.metadata.as_ref()?.fields;
    let text = |k: &str| match fields.get(k)?.kind.as_ref()? {
        zmesh_proto::prost_types::value::Kind::StringValue(s) => Some(s.as_str()),
        _ => None,
    };
    let group = text("AUTO_REGISTER_GROUP")?;
    let namespace = text("NAMESPACE").unwrap_or("");
    let named = |g: &&crate::config::workload_group::WorkloadGroupConfig| {
        g.name.0 == group && (namespace.is_empty() || g.namespace.0 == namespace)
    };
    // Of the groups with that name (in any namespace when none is given), the one admitting
    // the caller, if any.
    let admitting = cfg
        .workload_groups
        .iter()
        .filter(named)
        .find(|g| caller.is_some_and(|c| g.admits(&c.0)));
    let Some(g) = admitting.or_else(|| cfg.workload_groups.iter().find(named)) else {
        tracing::warn!(group = %truncate(group), namespace = %truncate(namespace), "xDS stream names an unknown workload group; nothing registered");
        return None;
    };
    let Some(caller) = caller else {
        tracing::warn!(%group, "auto-registration needs an authenticated node; nothing registered");
        return None;
    };
    if !g.admits(&caller.0) {
        tracing::warn!(%group, node = %caller.0, "node is not in the workload group's nodes; nothing registered");
        return None;
    }
    let ip: IpAddr = text("INSTANCE_IPS")
        .and_then(|ips| ips.split(',').next())
        .and_then(|ip| ip.trim().parse().ok())
        .or(peer_ip)?;
    if let Some(why) = address_refused(cfg, &caller.0, ip) {
        tracing::warn!(%group, node = %caller.0, %ip, "auto-registration refused: {why}");
        return None;
    }
    Some(g.register(&caller.0, ip))
}

/// Why a VM on `node` may not be registered at `ip` under the mesh file `cfg`, if it may not:
/// an address that is no single host's, a service's VIP, or another node's workload's address.
/// A VM cannot take over other traffic by naming its address. (Other registrations are
/// checked by [`Registry::add`].)
fn address_refused(cfg: &Config, node: &str, ip: IpAddr) -> Option<String> {
    let unicast = match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_link_local()
                || v4.is_broadcast())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unicast_link_local()
                || v6.to_ipv4_mapped().is_some())
        }
    };
    if !unicast {
        return Some("not a unicast host address".into());
    }
    if let Some(s) = cfg.services.iter().find(|s| s.vips.contains(&ip)) {
        return Some(format!(
            "the address is the VIP of service {}",
            s.hostname.0
        ));
    }
    cfg.workloads
        .iter()
        .find(|w| w.addresses.contains(&ip) && w.node.0 != node)
        .map(|w| {
            format!(
                "the address belongs to workload {} on another node",
                w.uid.0
            )
        })
}

/// Whether a registration still stands under `cfg`: its group is there and admits its node,
/// and its address is still free to take.
fn still_admitted(cfg: &Config, w: &crate::config::WorkloadConfig) -> bool {
    let group = w.canonical_name.as_ref().map(|g| g.0.as_str());
    cfg.workload_groups.iter().any(|g| {
        Some(g.name.0.as_str()) == group && g.namespace == w.namespace && g.admits(&w.node.0)
    }) && w
        .addresses
        .iter()
        .all(|ip| address_refused(cfg, &w.node.0, *ip).is_none())
}

/// The delta ADS service over a mesh file that the caller reloads into `mesh`.
#[derive(Debug, Clone)]
pub struct XdsServer {
    mesh: watch::Receiver<Arc<Config>>,
    cache: Arc<SnapshotCache>,
    streams: Arc<Semaphore>,
    max_streams: usize,
}

impl XdsServer {
    pub fn new(mesh: watch::Receiver<Arc<Config>>) -> XdsServer {
        XdsServer {
            mesh,
            cache: Arc::default(),
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            max_streams: MAX_STREAMS,
        }
    }

    /// Another bound on the streams open at once than [`MAX_STREAMS`].
    pub fn with_max_streams(mut self, max: usize) -> XdsServer {
        self.streams = Arc::new(Semaphore::new(max));
        self.max_streams = max;
        self
    }

    /// This server as a tonic service, with the request size bounded to [`MAX_REQUEST_BYTES`].
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<XdsServer> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

/// The tonic service, ready to be added to a `Server` (next to the CA service, for instance),
/// with the request size bounded to [`MAX_REQUEST_BYTES`].
pub fn service(mesh: watch::Receiver<Arc<Config>>) -> AggregatedDiscoveryServiceServer<XdsServer> {
    XdsServer::new(mesh).into_service()
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        // Over TCP tonic records the address itself; over the TLS incoming of `grpc::incoming`
        // it is that stream's connect info.
        let addr = request.remote_addr().or_else(|| {
            request
                .extensions()
                .get::<Option<std::net::SocketAddr>>()
                .copied()
                .flatten()
        });
        let peer = addr.map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            tracing::warn!(%peer, max = self.max_streams, "xDS stream refused: at the stream cap");
            Status::resource_exhausted(format!(
                "{} xDS streams are open on this server, its limit; retry later",
                self.max_streams
            ))
        })?;
        let caller = request.extensions().get::<CallerNode>().cloned();
        let peer_ip = addr.map(|a| a.ip());
        let requests = request.into_inner();
        let (tx, rx) = mpsc::channel(OUTBOX);
        let (mesh, cache) = (self.mesh.clone(), self.cache.clone());
        tokio::spawn(async move {
            let who = Caller {
                peer,
                node: caller,
                ip: peer_ip,
            };
            serve_stream(requests, mesh, cache, tx, who).await;
            drop(permit);
        });
        Ok(Response::new(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|x| (x, rx)) },
        ))))
    }
}

/// Moves messages between one stream, its [`StreamState`] and the config watch until the client
/// goes away or breaks the protocol.
/// Who opened a stream: its address (as text for the log, and the IP), and its token's node.
struct Caller {
    peer: String,
    node: Option<CallerNode>,
    ip: Option<IpAddr>,
}

async fn serve_stream(
    mut requests: Streaming<DeltaDiscoveryRequest>,
    mut mesh: watch::Receiver<Arc<Config>>,
    cache: Arc<SnapshotCache>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    who: Caller,
) {
    let peer = who.peer;
    let mut registered = cache.registry.generation.subscribe();
    registered.borrow_and_update();
    // Held for the stream's life: the registration goes when the stream does.
    let mut _registration: Option<Registration> = None;
    // The config is cloned out of the watch before converting it: the sender is never kept
    // waiting on a conversion.
    let first = mesh.borrow_and_update().clone();
    let mut state = StreamState::new(cache.get(&first));
    let mut greeted = false;
    let first_request = tokio::time::sleep(FIRST_REQUEST_TIMEOUT);
    tokio::pin!(first_request);
    // Once the config's sender is gone nothing can change: stop polling it (it would report the
    // same error at once, forever).
    let mut watching = true;
    loop {
        let out = tokio::select! {
            msg = requests.message() => match msg {
                Ok(Some(req)) => {
                    if !greeted {
                        greeted = true;
                        let node = req.node.as_ref().map_or("", |n| n.id.as_str());
                        tracing::info!(%peer, node = %truncate(node), "xDS stream opened");
                        let cfg = mesh.borrow().clone();
                        if let Some(w) = auto_registration(&cfg, &req, who.node.as_ref(), who.ip) {
                            let (uid, node) = (w.uid.0.clone(), w.node.0.clone());
                            match cache.registry.add(w) {
                                Ok(r) => {
                                    tracing::info!(%peer, %uid, %node, "workload auto-registered");
                                    _registration = Some(r);
                                }
                                Err(holder) => tracing::warn!(%peer, %uid, %holder, "auto-registration refused: another registered VM holds the address"),
                            }
                            registered.borrow_and_update();
                            // Nothing is subscribed yet: the state starts over from the
                            // snapshot that holds the registration.
                            state = StreamState::new(cache.get(&cfg));
                        }
                    }
                    match state.on_request(&req) {
                        Ok(r) => r.into_iter().collect::<Vec<_>>(),
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "xDS stream refused");
                            let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
                            return;
                        }
                    }
                }
                Ok(None) => {
                    tracing::debug!(%peer, "xDS stream closed by the client");
                    return;
                }
                Err(status) => {
                    tracing::debug!(%peer, error = %status, "xDS stream broken");
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            },
            r = registered.changed() => {
                if r.is_err() {
                    continue;
                }
                registered.borrow_and_update();
                let cfg = mesh.borrow().clone();
                state.on_snapshot(cache.get(&cfg))
            }
            changed = mesh.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                    continue;
                }
                let cfg = mesh.borrow_and_update().clone();
                state.on_snapshot(cache.get(&cfg))
            }
            () = &mut first_request, if !greeted => {
                tracing::debug!(%peer, "xDS stream sent no request in time");
                let _ = tx.send(Err(Status::deadline_exceeded(format!(
                    "no DeltaDiscoveryRequest within {FIRST_REQUEST_TIMEOUT:?} of opening the stream"
                )))).await;
                return;
            }
            () = tx.closed() => return,
        };
        for r in out {
            if tx.send(Ok(r)).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zmesh_proto::google::rpc;

    const MESH: &str = r#"
node: { name: n, certificates: { file_ca: { dir: /tmp/ca } } }
workloads:
  - { uid: wp, name: waypoint, namespace: shop, service_account: waypoint, addresses: [10.0.9.9, "fd00::9"], node: w }
  - uid: web-1
    name: web
    namespace: shop
    service_account: web
    trust_domain: example.org
    addresses: [10.0.0.1]
    node: n1
    workload_type: pod
    canonical_revision: v2
    status: unhealthy
    capacity: 0
    locality: { region: r, zone: z }
    services: { shop/web.shop.svc.cluster.local: { 80: 8080 } }
    waypoint: wp
  - { uid: legacy, name: legacy, namespace: shop, addresses: ["fd00::1"], node: n2, protocol: TCP, workload_type: vm }
services:
  - name: web
    namespace: shop
    hostname: web.shop.svc.cluster.local
    vips: [10.96.0.1, "fd00::96"]
    ports: { 80: 8080, 443: 8443 }
    subject_alt_names: ["spiffe://cluster.local/ns/shop/sa/web-canary"]
    load_balancing: { mode: strict, routing_preference: [zone, node] }
    waypoint: wp
policies:
  - name: strict
    namespace: shop
    action: deny
    dry_run: true
    rules: [{ clauses: [{ matches: [{ not_principals: ["*"] }] }] }]
  - name: to-web
    namespace: shop
    scope: { workload_selector: { workloads: [web, nobody] } }
    rules:
      - clauses:
          - matches:
              - principals: ["spiffe://cluster.local/ns/shop/sa/*", "*/sa/x", "exact"]
                service_accounts: [shop/a]
                not_service_accounts: [shop/b]
                source_ips: [10.0.0.0/8, "fd00::1"]
                destination_ports: [80]
                not_destination_ports: [81]
  - name: everywhere
    namespace: istio-system
    scope: global
  - { name: broken, namespace: shop, rules: [{ clauses: [{ matches: [{ source_ips: [nope] }] }] }] }
"#;

    fn cfg(text: &str) -> Config {
        Config::parse(text, "t.yaml").unwrap()
    }

    fn address(v: &Versioned) -> wl::address::Type {
        assert_eq!(v.resource.type_url, type_url::ADDRESS);
        wl::Address::decode(v.resource.value.as_slice())
            .unwrap()
            .r#type
            .unwrap()
    }

    fn workload_of(s: &Snapshot, name: &str) -> wl::Workload {
        match address(&s.addresses[name]) {
            wl::address::Type::Workload(w) => w,
            t => panic!("{name}: {t:?}"),
        }
    }

    fn authz(s: &Snapshot, name: &str) -> sec::Authorization {
        let v = &s.authorizations[name];
        assert_eq!(v.resource.type_url, type_url::AUTHORIZATION);
        sec::Authorization::decode(v.resource.value.as_slice()).unwrap()
    }

    #[test]
    fn workloads_carry_every_field_in_istio_terms() {
        let s = resources(&cfg(MESH));
        let web = workload_of(&s, "web-1");
        assert_eq!(
            (web.uid.as_str(), web.name.as_str(), web.namespace.as_str()),
            ("web-1", "web", "shop")
        );
        assert_eq!(web.addresses, vec![vec![10, 0, 0, 1]]);
        assert_eq!(web.tunnel_protocol, wl::TunnelProtocol::Hbone as i32);
        assert_eq!(web.trust_domain, "example.org");
        assert_eq!(web.service_account, "web");
        assert_eq!(web.node, "n1");
        assert_eq!(web.canonical_name, "web", "defaults to the name");
        assert_eq!(web.canonical_revision, "v2");
        assert_eq!(web.workload_type, wl::WorkloadType::Pod as i32);
        assert_eq!(web.workload_name, "web");
        assert_eq!(web.status, wl::WorkloadStatus::Unhealthy as i32);
        assert_eq!(
            web.capacity,
            Some(0),
            "capacity 0 is sent, not left unset (= 1)"
        );
        assert_eq!(web.cluster_id, "Kubernetes");
        let loc = web.locality.unwrap();
        assert_eq!((loc.region.as_str(), loc.zone.as_str()), ("r", "z"));
        assert_eq!(
            web.services["shop/web.shop.svc.cluster.local"].ports,
            vec![wl::Port {
                service_port: 80,
                target_port: 8080
            }]
        );
        // The waypoint by its first address, on the HBONE port.
        let wp = web.waypoint.unwrap();
        assert_eq!(wp.hbone_mtls_port, 15008);
        assert_eq!(
            wp.destination,
            Some(wl::gateway_address::Destination::Address(
                wl::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 0, 9, 9]
                }
            ))
        );
        assert_eq!(web.authorization_policies, vec!["shop/to-web".to_string()]);

        let wp = workload_of(&s, "wp");
        assert_eq!(wp.addresses.len(), 2);
        assert_eq!(wp.addresses[1].len(), 16);
        assert_eq!(wp.trust_domain, "cluster.local", "the node's trust domain");
        assert_eq!(wp.canonical_revision, "latest");
        assert_eq!(wp.capacity, Some(1));
        assert!(wp.locality.is_none() && wp.waypoint.is_none());
        assert!(
            wp.authorization_policies.is_empty(),
            "not named by the selector"
        );

        let legacy = workload_of(&s, "legacy");
        assert_eq!(legacy.tunnel_protocol, wl::TunnelProtocol::None as i32);
        assert_eq!(legacy.workload_type, wl::WorkloadType::Deployment as i32);
        assert_eq!(legacy.service_account, "default");
    }

    #[test]
    fn services_carry_vips_ports_sans_waypoint_and_load_balancing() {
        let s = resources(&cfg(MESH));
        let wl::address::Type::Service(svc) =
            address(&s.addresses["shop/web.shop.svc.cluster.local"])
        else {
            panic!("not a service")
        };
        assert_eq!(svc.name, "web");
        assert_eq!(svc.hostname, "web.shop.svc.cluster.local");
        assert_eq!(svc.addresses.len(), 2);
        assert_eq!(svc.addresses[0].address, vec![10, 96, 0, 1]);
        assert_eq!(svc.addresses[1].address.len(), 16);
        assert_eq!(svc.ip_families, wl::IpFamilies::Dual as i32);
        assert_eq!(svc.ports.len(), 2);
        assert_eq!(
            (svc.ports[1].service_port, svc.ports[1].target_port),
            (443, 8443)
        );
        assert_eq!(
            svc.subject_alt_names,
            vec!["spiffe://cluster.local/ns/shop/sa/web-canary".to_string()]
        );
        assert!(svc.waypoint.is_some());
        assert!(svc.canonical);
        let lb = svc.load_balancing.unwrap();
        assert_eq!(lb.mode, wl::load_balancing::Mode::Strict as i32);
        assert_eq!(
            lb.routing_preference,
            vec![
                wl::load_balancing::Scope::Zone as i32,
                wl::load_balancing::Scope::Node as i32
            ]
        );
    }

    #[test]
    fn service_defaults_stay_unset_as_istiod_leaves_them() {
        let text = r#"
node: { name: n, certificates: { file_ca: { dir: /tmp/ca } } }
services:
  - { name: a, namespace: d, hostname: a, vips: [10.96.0.1], ports: { 80: 80 } }
  - { name: b, namespace: d, hostname: b, vips: ["fd00::1"], ports: { 80: 80 }, load_balancing: { mode: failover } }
"#;
        let s = resources(&cfg(text));
        let svc = |k: &str| match address(&s.addresses[k]) {
            wl::address::Type::Service(s) => s,
            t => panic!("{t:?}"),
        };
        let a = svc("d/a");
        assert!(a.load_balancing.is_none() && a.waypoint.is_none());
        assert!(a.subject_alt_names.is_empty());
        assert_eq!(a.ip_families, wl::IpFamilies::Ipv4Only as i32);
        let b = svc("d/b");
        assert_eq!(b.ip_families, wl::IpFamilies::Ipv6Only as i32);
        let lb = b.load_balancing.unwrap();
        assert_eq!(lb.mode, wl::load_balancing::Mode::Failover as i32);
        assert!(lb.routing_preference.is_empty());
    }

    #[test]
    fn two_policies_with_one_name_are_both_served() {
        let text = "node: { name: n, certificates: { file_ca: { dir: /tmp/ca } } }\npolicies:\n  - { name: p, namespace: ns, action: allow, rules: [] }\n  - { name: p, namespace: ns, action: deny, rules: [{ clauses: [{ matches: [{ principals: [\"*\"] }] }] }] }\n";
        let s = resources(&cfg(text));
        assert_eq!(
            s.authorizations.keys().collect::<Vec<_>>(),
            ["ns/p", "ns/p#2"]
        );
        assert_eq!(authz(&s, "ns/p#2").action, sec::Action::Deny as i32);
    }

    #[test]
    fn policies_carry_scope_action_dry_run_and_matches() {
        let s = resources(&cfg(MESH));
        assert_eq!(
            s.authorizations.keys().collect::<Vec<_>>(),
            [
                "istio-system/everywhere",
                "shop/broken",
                "shop/strict",
                "shop/to-web"
            ],
        );
        // The broken policy is served as what the file enforces: deny-all over its namespace.
        let broken = authz(&s, "shop/broken");
        assert_eq!(broken.action, sec::Action::Deny as i32);
        assert_eq!(broken.scope, sec::Scope::Namespace as i32);
        assert_eq!(broken.rules.len(), 1);
        assert!(
            broken.rules[0].clauses.is_empty(),
            "a rule without clauses matches everything"
        );
        let strict = authz(&s, "shop/strict");
        assert_eq!(strict.scope, sec::Scope::Namespace as i32);
        assert_eq!(strict.action, sec::Action::Deny as i32);
        assert!(strict.dry_run);
        let m = &strict.rules[0].clauses[0].matches[0];
        assert_eq!(
            m.not_principals,
            vec![sec::StringMatch {
                match_type: Some(sec::string_match::MatchType::Presence(()))
            }]
        );
        assert_eq!(
            authz(&s, "istio-system/everywhere").scope,
            sec::Scope::Global as i32
        );

        let to_web = authz(&s, "shop/to-web");
        assert_eq!(to_web.scope, sec::Scope::WorkloadSelector as i32);
        assert_eq!(to_web.action, sec::Action::Allow as i32);
        let m = &to_web.rules[0].clauses[0].matches[0];
        use sec::string_match::MatchType as T;
        let kinds: Vec<_> = m.principals.iter().map(|p| p.match_type.clone()).collect();
        assert_eq!(
            kinds,
            vec![
                Some(T::Prefix("cluster.local/ns/shop/sa/".into())),
                Some(T::Suffix("/sa/x".into())),
                Some(T::Exact("exact".into()))
            ]
        );
        assert_eq!(
            m.source_ips,
            vec![
                sec::Address {
                    address: vec![10, 0, 0, 0],
                    length: 8
                },
                sec::Address {
                    address: "fd00::1"
                        .parse::<std::net::Ipv6Addr>()
                        .unwrap()
                        .octets()
                        .to_vec(),
                    length: 128
                }
            ]
        );
        assert_eq!(m.destination_ports, vec![80]);
        assert_eq!(m.not_destination_ports, vec![81]);
        assert_eq!(m.service_accounts[0].service_account, "a");
        assert_eq!(m.not_service_accounts[0].namespace, "shop");
    }

    #[test]
    fn versions_follow_content_only() {
        let a = resources(&cfg(MESH));
        let b = resources(&cfg(MESH));
        assert_eq!(a, b, "the same file gives the same versions");
        let changed = resources(&cfg(
            &MESH.replace("canonical_revision: v2", "canonical_revision: v3")
        ));
        assert_ne!(
            a.addresses["web-1"].version,
            changed.addresses["web-1"].version
        );
        assert_eq!(a.addresses["wp"].version, changed.addresses["wp"].version);
        assert_eq!(a.addresses["web-1"].version.len(), VERSION_HEX);
        // A workload backing many services encodes its map in one order every time.
        let many: String = (0..50)
            .map(|i| format!("shop/s{i}.shop: {{ {}: 80 }}, ", i + 1))
            .collect();
        let text = MESH.replace(
            "services: { shop/web.shop.svc.cluster.local: { 80: 8080 } }",
            &format!("services: {{ {many} }}"),
        );
        let versions: std::collections::HashSet<String> = (0..10)
            .map(|_| resources(&cfg(&text)).addresses["web-1"].version.clone())
            .collect();
        assert_eq!(versions.len(), 1, "{versions:?}");
    }

    #[test]
    fn colliding_names_keep_the_first_entry() {
        let text = r#"
node: { name: n, certificates: { file_ca: { dir: /tmp/ca } } }
workloads:
  - { uid: a, name: one, namespace: d, addresses: [10.0.0.1], node: n }
  - { uid: a, name: two, namespace: d, addresses: [10.0.0.2], node: n }
  - { uid: d/h, name: three, namespace: d, addresses: [10.0.0.3], node: n }
services:
  - { name: h, namespace: d, hostname: h, vips: [10.96.0.1], ports: { 80: 80 } }
"#;
        let s = resources(&cfg(text));
        assert_eq!(workload_of(&s, "a").name, "one");
        assert_eq!(workload_of(&s, "d/h").name, "three");
        assert_eq!(s.addresses.len(), 2);
    }

    fn subscribe(type_url: &str, initial: &[(&str, &str)]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.into(),
            initial_resource_versions: initial
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
        r.resources.iter().map(|x| x.name.as_str()).collect()
    }

    #[test]
    fn first_request_sends_what_the_client_lacks_and_what_it_must_drop() {
        let snap = Arc::new(resources(&cfg(MESH)));
        let mut st = StreamState::new(snap.clone());
        let wp = snap.addresses["wp"].version.as_str();
        let r = st
            .on_request(&subscribe(
                type_url::ADDRESS,
                &[("wp", wp), ("legacy", "stale"), ("gone", "x")],
            ))
            .unwrap()
            .unwrap();
        assert_eq!(
            names(&r),
            ["legacy", "shop/web.shop.svc.cluster.local", "web-1"]
        );
        assert_eq!(r.removed_resources, ["gone"]);
        assert_eq!(r.type_url, type_url::ADDRESS);
        // The same first request again is not a new subscription: nothing to send.
        assert!(st
            .on_request(&subscribe(type_url::ADDRESS, &[]))
            .unwrap()
            .is_none());
        // An empty type still answers.
        let mut st = StreamState::new(Arc::new(Snapshot::default()));
        let r = st
            .on_request(&subscribe(type_url::AUTHORIZATION, &[]))
            .unwrap()
            .unwrap();
        assert!(r.resources.is_empty() && r.removed_resources.is_empty());
        assert!(!r.nonce.is_empty());
    }

    #[test]
    fn acks_and_nacks_send_nothing_and_nonces_are_fresh() {
        let mut st = StreamState::new(Arc::new(resources(&cfg(MESH))));
        let a = st
            .on_request(&subscribe(type_url::ADDRESS, &[]))
            .unwrap()
            .unwrap();
        let b = st
            .on_request(&subscribe(type_url::AUTHORIZATION, &[]))
            .unwrap()
            .unwrap();
        assert_ne!(a.nonce, b.nonce);
        let ack = DeltaDiscoveryRequest {
            type_url: type_url::ADDRESS.into(),
            response_nonce: a.nonce.clone(),
            ..Default::default()
        };
        assert!(st.on_request(&ack).unwrap().is_none());
        let nack = DeltaDiscoveryRequest {
            error_detail: Some(rpc::Status {
                code: 3,
                message: "x".repeat(100_000),
                details: vec![],
            }),
            ..ack
        };
        assert!(st.on_request(&nack).unwrap().is_none());
        assert!(st.types[0].nack_logged);
        // Repeats are answered with nothing and logged once; a new response re-arms the log.
        assert!(st.on_request(&nack).unwrap().is_none());
        let text = MESH.replace("canonical_revision: v2", "canonical_revision: v9");
        assert_eq!(st.on_snapshot(Arc::new(resources(&cfg(&text)))).len(), 1);
        assert!(!st.types[0].nack_logged);
    }

    #[test]
    fn snapshot_changes_push_only_the_delta_to_subscribed_types() {
        let mut st = StreamState::new(Arc::new(resources(&cfg(MESH))));
        st.on_request(&subscribe(type_url::ADDRESS, &[])).unwrap();
        // Same content: nothing.
        assert!(st.on_snapshot(Arc::new(resources(&cfg(MESH)))).is_empty());
        let text = MESH
            .replace("canonical_revision: v2", "canonical_revision: v3")
            .replace(
                "  - { uid: legacy, name: legacy, namespace: shop, addresses: [\"fd00::1\"], node: n2, protocol: TCP, workload_type: vm }\n",
                "",
            )
            .replace("  - name: strict\n", "  - name: strict2\n");
        let out = st.on_snapshot(Arc::new(resources(&cfg(&text))));
        assert_eq!(out.len(), 1, "authorization is not subscribed: {out:?}");
        assert_eq!(names(&out[0]), ["web-1"]);
        assert_eq!(out[0].removed_resources, ["legacy"]);
    }

    #[test]
    fn on_demand_subscription_sends_known_names_and_removes_unknown_ones() {
        let snap = Arc::new(resources(&cfg(MESH)));
        let mut st = StreamState::new(snap.clone());
        let wp = snap.addresses["wp"].version.clone();
        st.on_request(&subscribe(type_url::ADDRESS, &[("wp", &wp)]))
            .unwrap();
        let mut req = subscribe(type_url::ADDRESS, &[]);
        req.resource_names_subscribe = vec!["wp".into(), "nope".into(), "nope".into(), "*".into()];
        let r = st.on_request(&req).unwrap().unwrap();
        assert!(r.resources.is_empty(), "wp is held at its version");
        assert_eq!(r.removed_resources, ["nope"]);
    }

    #[test]
    fn hostile_requests_get_a_clear_error() {
        let mut st = StreamState::new(Arc::new(Snapshot::default()));
        let e = st
            .on_request(&subscribe(
                "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                &[],
            ))
            .unwrap_err();
        assert!(e.to_string().contains("is not served here"), "{e}");
        let e = st
            .on_request(&subscribe(&"x".repeat(1 << 20), &[]))
            .unwrap_err();
        assert!(
            e.to_string().len() < 2 * MAX_LOGGED_ERROR,
            "the client's text is cut"
        );
        let mut req = subscribe(type_url::ADDRESS, &[]);
        req.resource_names_subscribe = vec!["a".into(); MAX_SUBSCRIBE_NAMES + 1];
        let e = st.on_request(&req).unwrap_err();
        assert_eq!(e, ProtocolError::TooManyNames(MAX_SUBSCRIBE_NAMES + 1));
        assert!(e.to_string().contains("resource_names_subscribe"), "{e}");
        // A huge initial map names nothing the server keeps beyond its answer.
        let many: Vec<(String, String)> =
            (0..10_000).map(|i| (format!("w{i}"), "v".into())).collect();
        let req = DeltaDiscoveryRequest {
            type_url: type_url::ADDRESS.into(),
            initial_resource_versions: many.into_iter().collect(),
            ..Default::default()
        };
        let r = st.on_request(&req).unwrap().unwrap();
        assert_eq!(r.removed_resources.len(), 10_000);
    }

    /// Every example file converts entry for entry, and each resource decodes and re-encodes to
    /// the same bytes.
    #[test]
    fn example_configs_convert_and_round_trip() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            seen += 1;
            let c = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let s = resources(&c);
            let valid = PolicyEntry::from_yaml_values(c.policies.clone())
                .iter()
                .filter(|p| matches!(p, PolicyEntry::Valid(_)))
                .count();
            assert_eq!(
                s.addresses.len(),
                c.workloads.len() + c.services.len(),
                "{}",
                path.display()
            );
            assert_eq!(s.authorizations.len(), valid, "{}", path.display());
            for v in s.addresses.values() {
                let decoded = wl::Address::decode(v.resource.value.as_slice()).unwrap();
                assert_eq!(decoded.encode_to_vec(), v.resource.value);
            }
            for v in s.authorizations.values() {
                let decoded = sec::Authorization::decode(v.resource.value.as_slice()).unwrap();
                assert_eq!(decoded.encode_to_vec(), v.resource.value);
            }
        }
        assert!(seen >= 5, "examples/*.yaml found: {seen}");
    }

    fn vm_request(metadata: &[(&str, &str)]) -> DeltaDiscoveryRequest {
        use zmesh_proto::prost_types::{value::Kind, Struct, Value};
        let fields = metadata
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(v.to_string())),
                    },
                )
            })
            .collect();
        DeltaDiscoveryRequest {
            type_url: type_url::ADDRESS.into(),
            node: Some(zmesh_proto::envoy::service::discovery::v3::Node {
                id: "vm".into(),
                metadata: Some(Struct { fields }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const GROUPS: &str = "node: { name: cp, certificates: { file_ca: { dir: /tmp/ca } } }\nworkload_groups:\n  - { name: billing, namespace: finance, service_account: billing-sa, network: vm-net, services: { \"finance/billing.finance.svc.cluster.local\": { 8080: 8080 } }, nodes: [\"vm-*\"] }\n";

    /// Istio's VM auto-registration: a stream whose metadata names a known group registers a
    /// workload on the node its token belongs to, at its INSTANCE_IPS (else its own address);
    /// every stream's snapshot carries it while the registering stream lives, and it is gone
    /// once that stream ends. Without a token's node, a known group or the right namespace,
    /// nothing is registered.
    #[test]
    fn a_vm_stream_registers_its_workload_for_as_long_as_it_lives() {
        let cfg = Arc::new(cfg(GROUPS));
        let node = CallerNode("vm-7".into());
        let meta = [
            ("AUTO_REGISTER_GROUP", "billing"),
            ("NAMESPACE", "finance"),
            ("INSTANCE_IPS", "192.0.2.7,fd00::7"),
            ("NODE_NAME", "someone-else"),
        ];
        let w = auto_registration(&cfg, &vm_request(&meta), Some(&node), None).unwrap();
        assert_eq!(w.uid.0, "finance/billing/vm-7");
        assert_eq!(
            w.node.0, "vm-7",
            "the token's node, not the metadata's NODE_NAME"
        );
        assert_eq!(w.addresses, vec!["192.0.2.7".parse::<IpAddr>().unwrap()]);
        // The peer address when the metadata names none.
        let peer: IpAddr = "198.51.100.4".parse().unwrap();
        let w2 = auto_registration(&cfg, &vm_request(&meta[..2]), Some(&node), Some(peer)).unwrap();
        assert_eq!(w2.addresses, vec![peer]);
        // Fail closed.
        assert!(auto_registration(&cfg, &vm_request(&meta), None, Some(peer)).is_none());
        let wrong_ns = [("AUTO_REGISTER_GROUP", "billing"), ("NAMESPACE", "other")];
        assert!(auto_registration(&cfg, &vm_request(&wrong_ns), Some(&node), Some(peer)).is_none());
        let unknown = [("AUTO_REGISTER_GROUP", "payroll")];
        assert!(auto_registration(&cfg, &vm_request(&unknown), Some(&node), Some(peer)).is_none());
        assert!(auto_registration(&cfg, &vm_request(&[]), Some(&node), Some(peer)).is_none());
        // A node the group does not admit registers nothing, whatever its metadata says.
        let laptop = CallerNode("laptop".into());
        assert!(auto_registration(&cfg, &vm_request(&meta), Some(&laptop), Some(peer)).is_none());
        // Nor does a VM that names another node's workload's address.
        let taken = Arc::new(self::cfg(&format!(
            "{GROUPS}workloads:\n  - {{ uid: db, name: db, namespace: finance, addresses: [192.0.2.7], node: node-b }}\n"
        )));
        assert!(auto_registration(&taken, &vm_request(&meta), Some(&node), None).is_none());
        // Nor one that names a service's VIP, or an address that is no single host's.
        let vip = Arc::new(self::cfg(&format!(
            "{GROUPS}services:\n  - {{ name: db, namespace: finance, hostname: db.finance.svc.cluster.local, vips: [192.0.2.7], ports: {{ 80: 80 }} }}\n"
        )));
        assert!(auto_registration(&vip, &vm_request(&meta), Some(&node), None).is_none());
        for bad in [
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "169.254.1.1",
            "255.255.255.255",
            "::1",
            "fe80::1",
            "::ffff:192.0.2.7",
        ] {
            let m = [("AUTO_REGISTER_GROUP", "billing"), ("INSTANCE_IPS", bad)];
            assert!(
                auto_registration(&cfg, &vm_request(&m), Some(&node), None).is_none(),
                "{bad}"
            );
        }
        // Without a namespace, the group of that name that admits the caller is the one taken.
        let two = Arc::new(self::cfg(&format!(
            "{GROUPS}  - {{ name: billing, namespace: aaa, nodes: [other] }}\n"
        )));
        let m = [
            ("AUTO_REGISTER_GROUP", "billing"),
            ("INSTANCE_IPS", "192.0.2.7"),
        ];
        let got = auto_registration(&two, &vm_request(&m), Some(&node), None).unwrap();
        assert_eq!(got.namespace.0, "finance");

        // Registered, every stream's snapshot has it; the stream ends, it is gone.
        let cache = SnapshotCache::default();
        assert!(!cache
            .get(&cfg)
            .addresses
            .contains_key("finance/billing/vm-7"));
        let guard = cache.registry.add(w.clone()).unwrap();
        // Another VM naming the same address is refused while the first holds it.
        let rival = auto_registration(
            &cfg,
            &vm_request(&meta),
            Some(&CallerNode("vm-8".into())),
            None,
        )
        .unwrap();
        assert_eq!(
            cache.registry.add(rival).err().as_deref(),
            Some("finance/billing/vm-7")
        );
        let with = cache.get(&cfg);
        let got = workload_of(&with, "finance/billing/vm-7");
        assert_eq!(got.service_account, "billing-sa");
        assert_eq!(got.network, "vm-net");
        assert_eq!(got.node, "vm-7");
        // A reconnect replaces it; the old stream's end leaves the new registration alone.
        let newer = cache.registry.add(w).unwrap();
        drop(guard);
        assert!(cache
            .get(&cfg)
            .addresses
            .contains_key("finance/billing/vm-7"));
        // A reload that stops admitting the node, or gives its address to a workload of the
        // file, withholds the registration from every snapshot while its stream lives on.
        let shut = Arc::new(self::cfg(&GROUPS.replace("\"vm-*\"", "vm-1")));
        assert!(!cache
            .get(&shut)
            .addresses
            .contains_key("finance/billing/vm-7"));
        assert!(!cache
            .get(&taken)
            .addresses
            .contains_key("finance/billing/vm-7"));
        assert!(cache
            .get(&cfg)
            .addresses
            .contains_key("finance/billing/vm-7"));
        drop(newer);
        assert!(!cache
            .get(&cfg)
            .addresses
            .contains_key("finance/billing/vm-7"));
    }
}
