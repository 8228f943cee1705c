//! The mesh model the data path reads: workloads and services indexed by address, built from the
//! config once per (re)load, plus outbound destination selection (docs/model.md "Outbound destination
//! selection"). Everything here is pure: no I/O, deterministic given the random source.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::Rng;

use crate::config::networks::{GatewayTarget, NetworkConfig, NetworkGatewayRef};
use crate::config::{
    AppTunnelProtocol, Config, HealthStatus, LoadBalancingMode, Locality, NodeConfig, RoutingScope,
    ServiceConfig, TunnelProtocol, WorkloadConfig,
};
use crate::identity::SpiffeId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub identity: SpiffeId,
    pub addresses: Vec<IpAddr>,
    pub node: String,
    pub cluster: String,
    pub protocol: TunnelProtocol,
    pub workload_type: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub healthy: bool,
    pub capacity: u32,
    pub locality: Locality,
    /// "namespace/hostname" → service port → target port.
    pub services: HashMap<String, HashMap<u16, u16>>,
    /// uid of the waypoint that handles traffic addressed to this workload.
    pub waypoint: Option<String>,
    /// Set when the workload asked for a PROXY application tunnel: the port the node dials
    /// for every CONNECT it terminates (None: the CONNECT's own target port). Protocol NONE
    /// is the same as no tunnel and leaves this unset.
    pub proxy_tunnel: Option<ProxyTunnel>,
    /// The network it is on ("" is Istio's default network).
    pub network: String,
}

/// An east-west gateway of another network, as the config names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    pub addr: SocketAddr,
    pub identity: SpiffeId,
}

/// A workload's PROXY application tunnel (docs/hbone.md "PROXY protocol").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyTunnel {
    /// The port dialed for every CONNECT; None keeps the CONNECT's target port.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    /// The address the DNS proxy gives a service that has no `vips` (node.dns.vip_range);
    /// the outbound path recognises it like a configured VIP (docs/capture.md "DNS proxy").
    pub auto_vip: Option<IpAddr>,
    pub ports: HashMap<u16, u16>,
    pub subject_alt_names: Vec<SpiffeId>,
    pub mode: LoadBalancingMode,
    pub routing_preference: Vec<RoutingScope>,
    /// uid of the waypoint that handles this service's traffic.
    pub waypoint: Option<String>,
    /// Limits waypoints apply when sending to this service.
    pub traffic_policy: Option<crate::waypoint::config::TrafficPolicy>,
    /// Declared protocols by service port.
    pub app_protocols: HashMap<u16, crate::config::AppProtocol>,
    /// Backing workloads, in config order.
    pub endpoints: Vec<Arc<Workload>>,
}

impl Service {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// What an outbound connection should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Tunnel through HBONE to `hbone_addr`, asking for `authority`.
    Hbone {
        hbone_addr: SocketAddr,
        authority: SocketAddr,
        expected: Vec<SpiffeId>,
        destination: Arc<Workload>,
        service: Option<Arc<Service>>,
    },
    /// A known destination that is not in the mesh: plain TCP to it.
    Direct {
        addr: SocketAddr,
        destination: Arc<Workload>,
        service: Option<Arc<Service>>,
    },
    /// Unknown destination: plain TCP, as the application asked.
    Passthrough { addr: SocketAddr },
    /// A service endpoint on another network: double HBONE (docs/hbone.md "Double HBONE").
    /// The outer tunnel goes to `gateway` (verified as `gateway_identity`), asking for
    /// `authority` (`hostname:port`); inside it, a second mTLS session verifies `expected`
    /// (the identities of the service's endpoints on `network`) and asks for the same authority.
    Gateway {
        gateway: SocketAddr,
        gateway_identity: SpiffeId,
        authority: String,
        expected: Vec<SpiffeId>,
        network: String,
        /// The endpoint chosen here; the gateway picks the one that serves.
        destination: Arc<Workload>,
        service: Arc<Service>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoHealthyEndpoint { service: String, port: u16 },
    #[error("service {service} has no port {port}")]
    NoSuchPort { service: String, port: u16 },
    #[error("destination {0} is not in the mesh registry and registry_only is set")]
    RegistryOnly(SocketAddr),
    #[error("workload {workload} is on network {network:?}: another network is reached only through a service")]
    RemoteWorkload { workload: String, network: String },
    #[error("service {service} has endpoints only on network {network:?}, none of them in the mesh (HBONE): a gateway cannot reach them")]
    RemoteNotMeshed { service: String, network: String },
    #[error(
        "service {service} has endpoints only on network {network:?}, which has no known gateway"
    )]
    NoGateway { service: String, network: String },
    #[error("waypoint {waypoint} is on network {network:?}: a waypoint on another network is not supported")]
    RemoteWaypoint { waypoint: String, network: String },
    #[error("no service has hostname {0:?}")]
    UnknownService(String),
    #[error("workload {workload} is not an endpoint of service {service}")]
    NotAnEndpoint { service: String, workload: String },
}

/// The whole model, immutable once built; a reload builds a new one.
#[derive(Debug, Default)]
pub struct Model {
    pub node: String,
    workloads_by_ip: HashMap<IpAddr, Arc<Workload>>,
    workloads_by_uid: HashMap<String, Arc<Workload>>,
    services_by_vip: HashMap<IpAddr, Arc<Service>>,
    /// Hostname and the short forms a client may use (`name.namespace`, `name.namespace.svc`).
    services_by_host: HashMap<String, Arc<Service>>,
    workloads: Vec<Arc<Workload>>,
    services: Vec<Arc<Service>>,
    pub hbone_port: u16,
    pub registry_only: bool,
    /// This node's network.
    pub network: String,
    /// Gateways by network name.
    gateways: HashMap<String, Vec<Gateway>>,
}

impl Model {
    pub fn from_config(cfg: &Config) -> Model {
        Model::build(&cfg.node, &cfg.workloads, &cfg.services).with_networks(&cfg.networks)
    }

    /// The gateways of `networks` (validated by the config: identities parse); a network the
    /// file names replaces what workloads said of it.
    pub fn with_networks(mut self, networks: &[NetworkConfig]) -> Model {
        for n in networks {
            let gws = n
                .gateways
                .iter()
                .filter_map(|g| {
                    Some(Gateway {
                        addr: SocketAddr::new(g.address, g.port),
                        identity: SpiffeId::parse(&g.identity).ok()?,
                    })
                })
                .collect();
            self.gateways.insert(n.name.0.clone(), gws);
        }
        self
    }

    /// The model of these workloads and services, as seen from the node `node`: the file and
    /// the xDS client both build it here (docs/model.md "Control plane").
    pub fn build<'a>(
        node: &NodeConfig,
        workload_configs: impl IntoIterator<Item = &'a WorkloadConfig>,
        service_configs: impl IntoIterator<Item = &'a ServiceConfig>,
    ) -> Model {
        let mut workloads = Vec::new();
        let mut workloads_by_ip = HashMap::new();
        // (network, its gateway as a workload names it), resolved once everything is built.
        let mut gateway_refs = Vec::new();
        let mut uids = std::collections::HashSet::new();
        for w in workload_configs {
            if !uids.insert(w.uid.0.as_str()) {
                tracing::warn!(uid = %w.uid, "duplicate workload uid; keeping the first entry");
                continue;
            }
            let td = w.trust_domain.as_ref().unwrap_or(&node.trust_domain);
            let Ok(identity) = SpiffeId::new(td, &w.namespace, &w.service_account) else {
                // Validated at config load and xDS conversion; never reached.
                tracing::error!(uid = %w.uid, "workload without a valid identity skipped");
                continue;
            };
            let wl = Arc::new(Workload {
                uid: w.uid.0.clone(),
                name: w.name.0.clone(),
                namespace: w.namespace.0.clone(),
                service_account: w.service_account.0.clone(),
                identity,
                addresses: w.addresses.clone(),
                node: w.node.0.clone(),
                cluster: node.cluster.0.clone(),
                protocol: w.protocol,
                workload_type: w.workload_type.0.clone(),
                canonical_name: w.canonical_name().to_string(),
                canonical_revision: w.canonical_revision().to_string(),
                healthy: w.status == HealthStatus::Healthy,
                capacity: w.capacity,
                locality: w.locality.clone(),
                services: w
                    .services
                    .iter()
                    .map(|(k, v)| (k.0.clone(), v.iter().map(|(a, b)| (*a, *b)).collect()))
                    .collect(),
                waypoint: w.waypoint.as_ref().map(|u| u.0.clone()),
                proxy_tunnel: w
                    .application_tunnel
                    .filter(|t| t.protocol == AppTunnelProtocol::Proxy)
                    .map(|t| ProxyTunnel {
                        port: (t.port != 0).then_some(t.port),
                    }),
                network: w.network.as_ref().unwrap_or(&node.network).0.clone(),
            });
            if let Some(g) = &w.network_gateway {
                gateway_refs.push((wl.network.clone(), g.clone()));
            }
            for ip in &wl.addresses {
                // Two workloads with one IP: the first in order wins, deterministically
                // (reliability #22); the loser is reported.
                if let Some(prev) = workloads_by_ip.get(ip) {
                    let prev: &Arc<Workload> = prev;
                    tracing::warn!(ip = %ip, kept = %prev.uid, ignored = %wl.uid, "two workloads claim one address; keeping the first");
                    continue;
                }
                workloads_by_ip.insert(*ip, wl.clone());
            }
            workloads.push(wl);
        }
        // Endpoints by service key in one pass (a push of 10,000 workloads and 1,000 services
        // must not cost their product).
        let mut endpoints_by_key: HashMap<&str, Vec<Arc<Workload>>> = HashMap::new();
        for w in &workloads {
            for key in w.services.keys() {
                endpoints_by_key
                    .entry(key.as_str())
                    .or_default()
                    .push(w.clone());
            }
        }
        let service_configs: Vec<&ServiceConfig> = service_configs.into_iter().collect();
        let auto_vips = auto_vips(node, &service_configs, &workloads_by_ip);
        let mut services = Vec::new();
        let mut services_by_vip = HashMap::new();
        for s in service_configs {
            let key = format!("{}/{}", s.namespace, s.hostname);
            let endpoints = endpoints_by_key
                .get(key.as_str())
                .cloned()
                .unwrap_or_default();
            let svc = Arc::new(Service {
                name: s.name.0.clone(),
                namespace: s.namespace.0.clone(),
                hostname: s.hostname.0.clone(),
                vips: s.vips.clone(),
                auto_vip: auto_vips
                    .get(s.hostname.0.as_str())
                    .copied()
                    .map(IpAddr::V4),
                ports: s.ports.iter().map(|(a, b)| (*a, *b)).collect(),
                subject_alt_names: s.subject_alt_names.iter().map(|x| x.0.clone()).collect(),
                mode: s.load_balancing.mode,
                routing_preference: s.load_balancing.routing_preference.clone(),
                waypoint: s.waypoint.as_ref().map(|u| u.0.clone()),
                traffic_policy: s.traffic_policy.clone(),
                app_protocols: s.app_protocols.iter().map(|(p, a)| (*p, *a)).collect(),
                endpoints,
            });
            for vip in svc.vips.iter().chain(&svc.auto_vip) {
                if services_by_vip.contains_key(vip) {
                    tracing::warn!(vip = %vip, ignored = %key, "two services claim one VIP; keeping the first");
                    continue;
                }
                services_by_vip.insert(*vip, svc.clone());
            }
            services.push(svc);
        }
        let services_by_key: HashMap<String, Arc<Service>> =
            services.iter().map(|s| (s.key(), s.clone())).collect();
        let gateways = resolve_gateways(gateway_refs, &workloads_by_ip, &services_by_key);
        Model {
            node: node.name.0.clone(),
            workloads_by_ip,
            workloads_by_uid: workloads
                .iter()
                .map(|w| (w.uid.clone(), w.clone()))
                .collect(),
            services_by_host: host_index(&services),
            services_by_vip,
            workloads,
            services,
            hbone_port: node.ports.hbone,
            registry_only: node.registry_only,
            network: node.network.0.clone(),
            gateways,
        }
    }

    /// The gateways the config names for `network`.
    pub fn gateways(&self, network: &str) -> &[Gateway] {
        self.gateways.get(network).map_or(&[], |g| g.as_slice())
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads_by_uid.get(uid)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads_by_ip.get(&ip)
    }

    /// The service a Host header names: its hostname, or `name.namespace[.svc]`.
    /// The service a name designates; DNS names compare ASCII case-insensitively.
    pub fn service_by_host(&self, host: &str) -> Option<&Arc<Service>> {
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.services_by_host.get(&host.to_ascii_lowercase())
        } else {
            self.services_by_host.get(host)
        }
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.services_by_vip.get(&ip)
    }

    /// The workload at `ip` if it runs on this node.
    pub fn local_workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_by_ip(ip).filter(|w| w.node == self.node)
    }

    /// Workloads running on this node.
    pub fn local_workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.iter().filter(|w| w.node == self.node)
    }

    pub fn workloads(&self) -> &[Arc<Workload>] {
        &self.workloads
    }

    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    /// Chooses where an outbound connection from `source` to `dst` goes.
    pub fn select(
        &self,
        source: &Workload,
        dst: SocketAddr,
        rng: &mut impl Rng,
    ) -> Result<Route, SelectError> {
        self.select_excluding(source, dst, rng, &|_| false)
    }

    /// `select`, never choosing a service endpoint for which `excluded` holds (a waypoint's
    /// outlier ejection).
    pub fn select_excluding(
        &self,
        source: &Workload,
        dst: SocketAddr,
        rng: &mut impl Rng,
        excluded: &dyn Fn(&Workload) -> bool,
    ) -> Result<Route, SelectError> {
        if let Some(route) = self.via_waypoint(source, dst) {
            return route;
        }
        if let Some(svc) = self.service_by_vip(dst.ip()) {
            return self.to_service(source, svc, dst, rng, excluded);
        }
        if let Some(w) = self.workload_by_ip(dst.ip()) {
            if w.network != source.network {
                return Err(SelectError::RemoteWorkload {
                    workload: w.name.clone(),
                    network: w.network.clone(),
                });
            }
            return Ok(self.route_to(w.clone(), dst, None));
        }
        if self.registry_only {
            return Err(SelectError::RegistryOnly(dst));
        }
        Ok(Route::Passthrough { addr: dst })
    }

    /// A service's endpoint for `dst` (a VIP and service port): on the source's network when it
    /// has a healthy one, else on another network through that network's gateway (docs/model.md
    /// "Networks").
    fn to_service(
        &self,
        source: &Workload,
        svc: &Arc<Service>,
        dst: SocketAddr,
        rng: &mut impl Rng,
        excluded: &dyn Fn(&Workload) -> bool,
    ) -> Result<Route, SelectError> {
        let default_target = *svc.ports.get(&dst.port()).ok_or(SelectError::NoSuchPort {
            service: svc.key(),
            port: dst.port(),
        })?;
        let key = svc.key();
        let candidates = endpoints_for_port(svc, dst.port(), default_target, excluded);
        let (local, remote): (Vec<_>, Vec<_>) = candidates
            .into_iter()
            .partition(|(w, _)| w.network == source.network);
        let no_endpoint = || SelectError::NoHealthyEndpoint {
            service: key.clone(),
            port: dst.port(),
        };
        if !local.is_empty() || remote.is_empty() {
            let candidates = prefer_closest(source, svc, local);
            let (w, target) = pick_weighted(&candidates, rng).ok_or_else(no_endpoint)?;
            let ip = pick_address(&w.addresses, dst.ip());
            return Ok(self.route_to(w.clone(), SocketAddr::new(ip, target), Some(svc.clone())));
        }
        // Only other networks have one: through their gateway, HBONE endpoints only (the
        // gateway relays the inner HBONE to the endpoint's node untouched).
        let first_network = remote[0].0.network.clone();
        let meshed: Vec<_> = remote
            .into_iter()
            .filter(|(w, _)| w.protocol == TunnelProtocol::Hbone)
            .collect();
        if meshed.is_empty() {
            return Err(SelectError::RemoteNotMeshed {
                service: key,
                network: first_network,
            });
        }
        let first_network = meshed[0].0.network.clone();
        let reachable: Vec<_> = meshed
            .into_iter()
            .filter(|(w, _)| self.gateways.get(&w.network).is_some_and(|g| !g.is_empty()))
            .collect();
        if reachable.is_empty() {
            return Err(SelectError::NoGateway {
                service: key,
                network: first_network,
            });
        }
        let candidates = prefer_closest(source, svc, reachable);
        let (w, _) = pick_weighted(&candidates, rng).ok_or_else(no_endpoint)?;
        let gateways = &self.gateways[&w.network];
        let gw = gateways[rng.gen_range(0..gateways.len())].clone();
        // The gateway picks the endpoint that serves: any of the service's on that network.
        let mut expected: Vec<SpiffeId> = Vec::new();
        for e in svc.endpoints.iter().filter(|e| e.network == w.network) {
            if !expected.contains(&e.identity) {
                expected.push(e.identity.clone());
            }
        }
        for san in &svc.subject_alt_names {
            if !expected.contains(san) {
                expected.push(san.clone());
            }
        }
        Ok(Route::Gateway {
            gateway: gw.addr,
            gateway_identity: gw.identity,
            authority: format!("{}:{}", svc.hostname, dst.port()),
            expected,
            network: w.network.clone(),
            destination: w.clone(),
            service: svc.clone(),
        })
    }

    /// East-west gateway side: the endpoint on this node's network that a caller from another
    /// network asking for `host:port` is relayed to, and its HBONE address. `gateway` (the
    /// gateway's own workload) stands in as the source for locality preference. Endpoints on
    /// this node and endpoints with the gateway's identity (its replicas) are never picked: a
    /// gateway relays to workloads, never to itself or to another gateway.
    pub fn gateway_target(
        &self,
        gateway: &Workload,
        host: &str,
        port: u16,
        rng: &mut impl Rng,
    ) -> Result<(Arc<Service>, Arc<Workload>, SocketAddr), SelectError> {
        let svc = self
            .service_by_host(host)
            .ok_or_else(|| SelectError::UnknownService(host.to_string()))?;
        let default_target = *svc.ports.get(&port).ok_or(SelectError::NoSuchPort {
            service: svc.key(),
            port,
        })?;
        let not_a_gateway = |w: &Workload| w.node == self.node || w.identity == gateway.identity;
        let candidates: Vec<_> = endpoints_for_port(svc, port, default_target, &not_a_gateway)
            .into_iter()
            .filter(|(w, _)| w.network == self.network && w.protocol == TunnelProtocol::Hbone)
            .collect();
        let candidates = prefer_closest(gateway, svc, candidates);
        let (w, _) =
            pick_weighted(&candidates, rng).ok_or_else(|| SelectError::NoHealthyEndpoint {
                service: svc.key(),
                port,
            })?;
        let ip = w.addresses[0];
        Ok((svc.clone(), w.clone(), SocketAddr::new(ip, self.hbone_port)))
    }

    /// Destination side of a CONNECT for `host:port` (double HBONE's inner CONNECT): the
    /// target port on `workload` (which owns the listener), which must back that service.
    pub fn service_target(
        &self,
        host: &str,
        port: u16,
        workload: &Workload,
    ) -> Result<(Arc<Service>, u16), SelectError> {
        let svc = self
            .service_by_host(host)
            .ok_or_else(|| SelectError::UnknownService(host.to_string()))?;
        let default_target = *svc.ports.get(&port).ok_or(SelectError::NoSuchPort {
            service: svc.key(),
            port,
        })?;
        let map = workload
            .services
            .get(&svc.key())
            .ok_or_else(|| SelectError::NotAnEndpoint {
                service: svc.key(),
                workload: workload.name.clone(),
            })?;
        let target = if map.is_empty() {
            default_target
        } else {
            *map.get(&port).ok_or(SelectError::NoSuchPort {
                service: svc.key(),
                port,
            })?
        };
        Ok((svc.clone(), target))
    }

    /// docs/model.md steps 2 and 3: a Service VIP or workload IP that names a waypoint is sent to
    /// that waypoint, with the ORIGINAL destination as `:authority` so the waypoint can apply the
    /// destination's L7 rules. Traffic from the waypoint itself goes on to the destination.
    fn via_waypoint(
        &self,
        source: &Workload,
        dst: SocketAddr,
    ) -> Option<Result<Route, SelectError>> {
        let (uid, service) = match self.service_by_vip(dst.ip()) {
            Some(svc) => (svc.waypoint.as_ref()?, Some(svc.clone())),
            None => (self.workload_by_ip(dst.ip())?.waypoint.as_ref()?, None),
        };
        if *uid == source.uid {
            return None;
        }
        let wp = self.workload_by_uid(uid)?;
        if wp.network != source.network {
            // Never skipped (its L7 policy would be bypassed): the traffic fails.
            return Some(Err(SelectError::RemoteWaypoint {
                waypoint: wp.name.clone(),
                network: wp.network.clone(),
            }));
        }
        let ip = pick_address(&wp.addresses, dst.ip());
        Some(Ok(Route::Hbone {
            hbone_addr: SocketAddr::new(ip, self.hbone_port),
            authority: dst,
            expected: vec![wp.identity.clone()],
            destination: wp.clone(),
            service,
        }))
    }

    fn route_to(
        &self,
        destination: Arc<Workload>,
        target: SocketAddr,
        service: Option<Arc<Service>>,
    ) -> Route {
        match destination.protocol {
            TunnelProtocol::Hbone => {
                let mut expected = vec![destination.identity.clone()];
                if let Some(s) = &service {
                    for san in &s.subject_alt_names {
                        if !expected.contains(san) {
                            expected.push(san.clone());
                        }
                    }
                }
                Route::Hbone {
                    hbone_addr: SocketAddr::new(target.ip(), self.hbone_port),
                    authority: target,
                    expected,
                    destination,
                    service,
                }
            }
            TunnelProtocol::Tcp => Route::Direct {
                addr: target,
                destination,
                service,
            },
        }
    }
}

/// The gateways workloads name (istiod's `network_gateway`), by the naming workload's network:
/// an address is the workload there (its identity is the one the outer TLS verifies); a service
/// stands for its healthy endpoints. One that resolves to nothing is left out and logged, so its
/// network's endpoints are never chosen (fail closed).
fn resolve_gateways(
    refs: Vec<(String, NetworkGatewayRef)>,
    by_ip: &HashMap<IpAddr, Arc<Workload>>,
    by_key: &HashMap<String, Arc<Service>>,
) -> HashMap<String, Vec<Gateway>> {
    let mut out: HashMap<String, Vec<Gateway>> = HashMap::new();
    for (network, r) in refs {
        let found: Vec<Gateway> = match &r.target {
            GatewayTarget::Ip(ip) => by_ip
                .get(ip)
                .map(|w| Gateway {
                    addr: SocketAddr::new(*ip, r.port),
                    identity: w.identity.clone(),
                })
                .into_iter()
                .collect(),
            GatewayTarget::Service(key) => by_key
                .get(key)
                .map(|s| {
                    s.endpoints
                        .iter()
                        .filter(|w| w.healthy && !w.addresses.is_empty())
                        .map(|w| Gateway {
                            addr: SocketAddr::new(w.addresses[0], r.port),
                            identity: w.identity.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        if found.is_empty() {
            tracing::warn!(network = %network, gateway = ?r.target, "network gateway names no known workload or service endpoint; that network is unreachable until it does");
            continue;
        }
        let list = out.entry(network).or_default();
        for g in found {
            if !list.contains(&g) && list.len() < crate::config::networks::MAX_GATEWAYS {
                list.push(g);
            }
        }
    }
    out
}

/// Every name a service answers to; the first service to claim a name keeps it.
/// Auto-allocated VIPs (by hostname) for the services without `vips` whose hostname is not under
/// `node.dns.cluster_domain` (a Kubernetes service without a ClusterIP is headless: kube-dns
/// answers it with pod IPs). Allocated whether or not this node's DNS proxy is on: a waypoint
/// must recognise the auto VIP a client node's proxy handed out, so the table depends only on
/// the model and `vip_range` (docs/capture.md "DNS proxy").
fn auto_vips(
    node: &NodeConfig,
    services: &[&ServiceConfig],
    workloads_by_ip: &HashMap<IpAddr, Arc<Workload>>,
) -> std::collections::BTreeMap<String, std::net::Ipv4Addr> {
    let taken: std::collections::HashSet<IpAddr> = services
        .iter()
        .flat_map(|s| s.vips.iter().copied())
        .chain(workloads_by_ip.keys().copied())
        .collect();
    let cluster_domain = node
        .dns
        .cluster_domain
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let unaddressed = services
        .iter()
        .filter(|s| s.vips.is_empty())
        .map(|s| s.hostname.0.as_str())
        .filter(|h| !under_domain(h, &cluster_domain));
    crate::dns::vip::allocate(node.dns.vip_range, unaddressed, &taken)
}

/// Whether `host` is `domain` or a name under it (ASCII case-insensitive).
fn under_domain(host: &str, domain: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == domain
        || host
            .strip_suffix(domain)
            .is_some_and(|rest| rest.ends_with('.'))
}

fn host_index(services: &[Arc<Service>]) -> HashMap<String, Arc<Service>> {
    let mut index = HashMap::new();
    for s in services {
        // Indexed lowercased: `service_by_host` lowercases what it is asked (DNS names are
        // case-insensitive, and the DNS proxy asks in lowercase).
        index
            .entry(s.hostname.to_ascii_lowercase())
            .or_insert_with(|| s.clone());
    }
    for s in services {
        for alias in [
            format!("{}.{}", s.name, s.namespace),
            format!("{}.{}.svc", s.name, s.namespace),
        ] {
            index
                .entry(alias.to_ascii_lowercase())
                .or_insert_with(|| s.clone());
        }
    }
    index
}

/// A service's healthy endpoints that serve `port`, with their target port (their own map, else
/// the service's `default_target`).
fn endpoints_for_port<'a>(
    svc: &'a Service,
    port: u16,
    default_target: u16,
    excluded: &dyn Fn(&Workload) -> bool,
) -> Vec<(&'a Arc<Workload>, u16)> {
    let key = svc.key();
    svc.endpoints
        .iter()
        .filter(|w| w.healthy && !w.addresses.is_empty() && !excluded(w))
        .filter_map(|w| {
            let target = match w.services.get(&key) {
                Some(map) if !map.is_empty() => *map.get(&port)?,
                _ => default_target,
            };
            Some((w, target))
        })
        .collect()
}

/// Same address family as the one the application dialed, when the endpoint has it.
fn pick_address(addrs: &[IpAddr], dialed: IpAddr) -> IpAddr {
    addrs
        .iter()
        .find(|a| a.is_ipv4() == dialed.is_ipv4())
        .copied()
        .unwrap_or(addrs[0])
}

fn matches_scope(source: &Workload, w: &Workload, scope: RoutingScope) -> bool {
    match scope {
        RoutingScope::Region => source.locality.region == w.locality.region,
        RoutingScope::Zone => source.locality.zone == w.locality.zone,
        RoutingScope::Subzone => source.locality.subzone == w.locality.subzone,
        RoutingScope::Node => source.node == w.node,
        RoutingScope::Cluster => source.cluster == w.cluster,
    }
}

/// Applies the service's routing preference: the endpoints matching the longest prefix of the
/// preference list win. Strict mode keeps only full matches (possibly none).
fn prefer_closest<'a>(
    source: &Workload,
    svc: &Service,
    candidates: Vec<(&'a Arc<Workload>, u16)>,
) -> Vec<(&'a Arc<Workload>, u16)> {
    let prefs = &svc.routing_preference;
    if prefs.is_empty() {
        return candidates;
    }
    let rank = |w: &Workload| {
        prefs
            .iter()
            .take_while(|s| matches_scope(source, w, **s))
            .count()
    };
    if svc.mode == LoadBalancingMode::Strict {
        return candidates
            .into_iter()
            .filter(|(w, _)| rank(w) == prefs.len())
            .collect();
    }
    let best = candidates.iter().map(|(w, _)| rank(w)).max().unwrap_or(0);
    candidates
        .into_iter()
        .filter(|(w, _)| rank(w) == best)
        .collect()
}

/// Weighted-random choice by capacity (weight 0 is never picked).
fn pick_weighted<'a>(
    candidates: &[(&'a Arc<Workload>, u16)],
    rng: &mut impl Rng,
) -> Option<(&'a Arc<Workload>, u16)> {
    let total: u64 = candidates.iter().map(|(w, _)| u64::from(w.capacity)).sum();
    if total == 0 {
        return None;
    }
    let mut n = rng.gen_range(0..total);
    for (w, t) in candidates {
        let c = u64::from(w.capacity);
        if n < c {
            return Some((w, *t));
        }
        n -= c;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn model(extra: &str) -> Model {
        let text = format!(
            r#"
node:
  name: node-a
  certificates: {{ file_ca: {{ dir: /tmp/ca }} }}
workloads:
  - uid: client
    name: client
    namespace: default
    addresses: [10.0.0.1]
    node: node-a
    locality: {{ region: r1, zone: z1 }}
  - uid: echo-1
    name: echo-1
    namespace: default
    service_account: echo
    addresses: [10.0.1.1]
    node: node-b
    locality: {{ region: r1, zone: z1 }}
    services: {{ "default/echo.default.svc.cluster.local": {{ 80: 8080 }} }}
  - uid: echo-2
    name: echo-2
    namespace: default
    service_account: echo
    addresses: [10.0.1.2]
    node: node-c
    capacity: 3
    locality: {{ region: r1, zone: z2 }}
    services: {{ "default/echo.default.svc.cluster.local": {{}} }}
  - uid: legacy
    name: legacy
    namespace: default
    addresses: [10.0.2.1]
    node: node-c
    protocol: TCP
  - uid: sick
    name: sick
    namespace: default
    addresses: [10.0.3.1]
    node: node-c
    status: unhealthy
    services: {{ "default/sick.default.svc.cluster.local": {{}} }}
services:
  - name: echo
    namespace: default
    hostname: echo.default.svc.cluster.local
    vips: [10.96.0.10]
    ports: {{ 80: 9090 }}
    subject_alt_names: ["spiffe://cluster.local/ns/default/sa/echo-canary"]
{extra}
  - name: sick
    namespace: default
    hostname: sick.default.svc.cluster.local
    vips: [10.96.0.11]
    ports: {{ 80: 80 }}
"#
        );
        Model::from_config(&Config::parse(&text, "t").unwrap())
    }

    fn sel(m: &Model, dst: &str) -> Result<Route, SelectError> {
        let src = m
            .workload_by_ip("10.0.0.1".parse().unwrap())
            .unwrap()
            .clone();
        m.select(
            &src,
            dst.parse().unwrap(),
            &mut rand::rngs::StdRng::seed_from_u64(7),
        )
    }

    #[test]
    fn pod_ip_of_mesh_workload_is_hbone_to_its_15008() {
        match sel(&model(""), "10.0.1.1:8080").unwrap() {
            Route::Hbone {
                hbone_addr,
                authority,
                expected,
                destination,
                service,
            } => {
                assert_eq!(hbone_addr, "10.0.1.1:15008".parse().unwrap());
                assert_eq!(authority, "10.0.1.1:8080".parse().unwrap());
                assert_eq!(
                    expected,
                    vec![SpiffeId::parse("spiffe://cluster.local/ns/default/sa/echo").unwrap()]
                );
                assert_eq!(destination.uid, "echo-1");
                assert!(service.is_none());
            }
            r => panic!("unexpected {r:?}"),
        }
    }

    #[test]
    fn vip_picks_endpoint_with_workload_port_map_then_service_target() {
        let m = model("");
        let mut seen = HashMap::new();
        let src = m
            .workload_by_ip("10.0.0.1".parse().unwrap())
            .unwrap()
            .clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..4000 {
            match m
                .select(&src, "10.96.0.10:80".parse().unwrap(), &mut rng)
                .unwrap()
            {
                Route::Hbone {
                    authority,
                    expected,
                    ..
                } => {
                    assert_eq!(expected.len(), 2, "service SANs are expected too");
                    *seen.entry(authority).or_insert(0) += 1;
                }
                r => panic!("unexpected {r:?}"),
            }
        }
        // echo-1 maps 80→8080 itself; echo-2 has an empty map and takes the service's 9090.
        let a = seen[&"10.0.1.1:8080".parse().unwrap()];
        let b = seen[&"10.0.1.2:9090".parse().unwrap()];
        // Capacity 1 vs 3: expect ~1000 vs ~3000.
        assert!((800..1200).contains(&a), "{a}");
        assert!((2800..3200).contains(&b), "{b}");
    }

    #[test]
    fn routing_preference_and_strict_mode() {
        let m = model("    load_balancing: { mode: failover, routing_preference: [region, zone] }");
        for _ in 0..20 {
            let Route::Hbone { destination, .. } = sel(&m, "10.96.0.10:80").unwrap() else {
                panic!()
            };
            assert_eq!(destination.uid, "echo-1", "same zone preferred");
        }
        let m = model("    load_balancing: { mode: strict, routing_preference: [node] }");
        assert_eq!(
            sel(&m, "10.96.0.10:80"),
            Err(SelectError::NoHealthyEndpoint {
                service: "default/echo.default.svc.cluster.local".into(),
                port: 80
            })
        );
    }

    #[test]
    fn errors_and_non_mesh_destinations() {
        let m = model("");
        assert!(matches!(
            sel(&m, "10.96.0.10:81"),
            Err(SelectError::NoSuchPort { port: 81, .. })
        ));
        assert!(matches!(
            sel(&m, "10.96.0.11:80"),
            Err(SelectError::NoHealthyEndpoint { .. })
        ));
        assert!(matches!(sel(&m, "10.0.2.1:5432"), Ok(Route::Direct { .. })));
        assert_eq!(
            sel(&m, "192.0.2.9:443"),
            Ok(Route::Passthrough {
                addr: "192.0.2.9:443".parse().unwrap()
            })
        );
        let mut m = model("");
        m.registry_only = true;
        assert!(matches!(
            sel(&m, "192.0.2.9:443"),
            Err(SelectError::RegistryOnly(_))
        ));
    }

    #[test]
    fn local_workloads_are_those_on_this_node() {
        let m = model("");
        let local: Vec<_> = m.local_workloads().map(|w| w.uid.as_str()).collect();
        assert_eq!(local, vec!["client"]);
        assert!(m.local_workload("10.0.1.1".parse().unwrap()).is_none());
    }

    /// A config where the service `echo` and the workload `echo-1` name the waypoint `wp`.
    fn waypoint_model() -> Model {
        let text = r#"
node: { name: node-a, certificates: { file_ca: { dir: /tmp/ca } } }
workloads:
  - { uid: client, name: client, namespace: default, addresses: [10.0.0.1], node: node-a }
  - { uid: wp, name: waypoint, namespace: default, service_account: waypoint, addresses: [10.0.9.9], node: node-w }
  - uid: echo-1
    name: echo-1
    namespace: default
    addresses: [10.0.1.1]
    node: node-b
    waypoint: wp
    services: { "default/echo": { 80: 8080 } }
  - { uid: plain, name: plain, namespace: default, addresses: [10.0.1.2], node: node-b }
services:
  - { name: echo, namespace: default, hostname: echo, vips: [10.96.0.10], ports: { 80: 8080 }, waypoint: wp }
"#;
        Model::from_config(&Config::parse(text, "t").unwrap())
    }

    #[test]
    fn a_service_or_workload_with_a_waypoint_is_sent_to_it_with_the_original_authority() {
        let m = waypoint_model();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let from = |uid: &str| m.workload_by_uid(uid).unwrap().clone();
        for dst in ["10.96.0.10:80", "10.0.1.1:8080"] {
            match m
                .select(&from("client"), dst.parse().unwrap(), &mut rng)
                .unwrap()
            {
                Route::Hbone {
                    hbone_addr,
                    authority,
                    expected,
                    destination,
                    ..
                } => {
                    assert_eq!(hbone_addr, "10.0.9.9:15008".parse().unwrap(), "{dst}");
                    assert_eq!(authority, dst.parse().unwrap(), "the original destination");
                    assert_eq!(expected, vec![destination.identity.clone()]);
                    assert_eq!(destination.uid, "wp");
                }
                r => panic!("{dst}: {r:?}"),
            }
        }
        // The waypoint's own traffic goes on to the destination, never back to itself.
        match m
            .select(&from("wp"), "10.96.0.10:80".parse().unwrap(), &mut rng)
            .unwrap()
        {
            Route::Hbone { authority, .. } => {
                assert_eq!(authority, "10.0.1.1:8080".parse().unwrap())
            }
            r => panic!("{r:?}"),
        }
        // A workload without a waypoint is reached directly.
        match m
            .select(&from("client"), "10.0.1.2:80".parse().unwrap(), &mut rng)
            .unwrap()
        {
            Route::Hbone { hbone_addr, .. } => {
                assert_eq!(hbone_addr, "10.0.1.2:15008".parse().unwrap())
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn a_waypoint_must_name_a_known_hbone_workload() {
        let base = "node: { name: n, certificates: { file_ca: { dir: /tmp/ca } } }\nworkloads:\n  - { uid: a, name: a, namespace: d, addresses: [10.0.0.1], node: n, waypoint: nope }\n";
        let e = Config::parse(base, "t").unwrap_err().to_string();
        assert!(
            e.contains("workloads[0].waypoint") && e.contains("nope"),
            "{e}"
        );
        let tcp = base.replace("waypoint: nope", "waypoint: b") + "  - { uid: b, name: b, namespace: d, addresses: [10.0.0.2], node: n, protocol: TCP }\n";
        let e = Config::parse(&tcp, "t").unwrap_err().to_string();
        assert!(e.contains("must speak HBONE"), "{e}");
    }

    #[test]
    fn hostnames_match_case_insensitively_and_auto_vips_skip_the_cluster_domain() {
        let text = "node: { name: n, certificates: { file_ca: { dir: /tmp/ca } } }
services:
  - { name: api, namespace: shop, hostname: Api.Example.COM, ports: { 443: 443 } }
  - { name: hl, namespace: shop, hostname: hl.shop.svc.Cluster.Local, ports: { 80: 80 } }
";
        let m = Model::from_config(&Config::parse(text, "t").unwrap());
        let api = m
            .service_by_host("api.example.com")
            .expect("lowercase finds it");
        assert!(Arc::ptr_eq(
            api,
            m.service_by_host("API.example.com").unwrap()
        ));
        // Allocated with the node's DNS proxy off (a waypoint must know it too).
        assert!(api.auto_vip.is_some());
        let hl = m.service_by_host("hl.shop.svc.cluster.local").unwrap();
        assert_eq!(hl.auto_vip, None, "headless: kube-dns answers it");
    }

    #[test]
    fn services_are_found_by_hostname_and_short_names() {
        let m = model("");
        let by = |h: &str| m.service_by_host(h).map(|s| s.name.clone());
        assert_eq!(
            by("echo.default.svc.cluster.local").as_deref(),
            Some("echo")
        );
        assert_eq!(by("echo.default").as_deref(), Some("echo"));
        assert_eq!(by("echo.default.svc").as_deref(), Some("echo"));
        assert_eq!(by("echo.other"), None);
        assert_eq!(by("echo"), None, "a bare name needs the caller's namespace");
    }

    /// Node a1 on network-a; `db` has endpoints on a2 (network-a) and b1 (network-b, reached
    /// through its gateway); `only-b` only on b1; `only-c` only on network-c, which has no
    /// gateway; `b1` is also addressed directly.
    fn networks_model(a2_status: &str) -> Model {
        let text = format!(
            r#"
node:
  name: a1
  network: network-a
  certificates: {{ file_ca: {{ dir: /tmp/ca }} }}
networks:
  - name: network-b
    gateways: [{{ address: 10.77.9.2, identity: "spiffe://cluster.local/ns/istio-system/sa/eastwest" }}]
workloads:
  - {{ uid: client, name: client, namespace: shop, addresses: [10.77.1.1], node: a1 }}
  - {{ uid: db-a, name: db-a, namespace: data, service_account: db, addresses: [10.77.1.2], node: a2, status: {a2_status}, services: {{ "data/db.data.svc.cluster.local": {{ 80: 8080 }}, "data/only-c.data.svc.cluster.local": {{}} }} }}
  - {{ uid: db-b, name: db-b, namespace: data, service_account: db-remote, addresses: [10.77.2.1], node: b1, network: network-b, services: {{ "data/db.data.svc.cluster.local": {{ 80: 8080 }}, "data/only-b.data.svc.cluster.local": {{}} }} }}
  - {{ uid: c1, name: c1, namespace: data, addresses: [10.77.3.1], node: c1, network: network-c, services: {{ "data/only-c.data.svc.cluster.local": {{}} }} }}
services:
  - {{ name: db, namespace: data, hostname: db.data.svc.cluster.local, vips: [10.96.77.1], ports: {{ 80: 8080 }} }}
  - {{ name: only-b, namespace: data, hostname: only-b.data.svc.cluster.local, vips: [10.96.77.2], ports: {{ 5432: 5432 }} }}
  - {{ name: only-c, namespace: data, hostname: only-c.data.svc.cluster.local, vips: [10.96.77.3], ports: {{ 80: 80 }} }}
"#
        );
        Model::from_config(&Config::parse(&text, "t").unwrap())
    }

    fn sel_from(m: &Model, src: &str, dst: &str) -> Result<Route, SelectError> {
        let src = m.workload_by_ip(src.parse().unwrap()).unwrap().clone();
        m.select(
            &src,
            dst.parse().unwrap(),
            &mut rand::rngs::StdRng::seed_from_u64(7),
        )
    }

    #[test]
    fn a_service_prefers_its_endpoints_on_the_callers_network_then_goes_through_the_gateway() {
        let m = networks_model("healthy");
        for _ in 0..20 {
            match sel_from(&m, "10.77.1.1", "10.96.77.1:80").unwrap() {
                Route::Hbone { hbone_addr, .. } => {
                    assert_eq!(hbone_addr, "10.77.1.2:15008".parse().unwrap())
                }
                other => panic!("local endpoint expected, got {other:?}"),
            }
        }
        // The local endpoint is gone: the remote one, through network-b's gateway.
        let m = networks_model("unhealthy");
        match sel_from(&m, "10.77.1.1", "10.96.77.1:80").unwrap() {
            Route::Gateway {
                gateway,
                gateway_identity,
                authority,
                expected,
                network,
                destination,
                ..
            } => {
                assert_eq!(gateway, "10.77.9.2:15008".parse().unwrap());
                assert_eq!(
                    gateway_identity.to_string(),
                    "spiffe://cluster.local/ns/istio-system/sa/eastwest"
                );
                assert_eq!(authority, "db.data.svc.cluster.local:80");
                let expected: Vec<String> = expected.iter().map(|i| i.to_string()).collect();
                assert_eq!(expected, ["spiffe://cluster.local/ns/data/sa/db-remote"]);
                assert_eq!(network, "network-b");
                assert_eq!(destination.uid, "db-b");
            }
            other => panic!("gateway route expected, got {other:?}"),
        }
        assert!(matches!(
            sel_from(&m, "10.77.1.1", "10.96.77.2:5432").unwrap(),
            Route::Gateway { .. }
        ));
    }

    #[test]
    fn other_networks_are_reached_only_through_a_service_and_a_known_gateway() {
        let m = networks_model("unhealthy");
        // A pod IP on another network: no route to it from here.
        assert_eq!(
            sel_from(&m, "10.77.1.1", "10.77.2.1:8080").unwrap_err(),
            SelectError::RemoteWorkload {
                workload: "db-b".into(),
                network: "network-b".into()
            }
        );
        // network-c has no gateway in the config: refused, never sent in the clear.
        assert_eq!(
            sel_from(&m, "10.77.1.1", "10.96.77.3:80").unwrap_err(),
            SelectError::NoGateway {
                service: "data/only-c.data.svc.cluster.local".into(),
                network: "network-c".into()
            }
        );
    }

    #[test]
    fn gateway_and_destination_sides_resolve_the_hostname_authority() {
        // Seen from network-b's gateway node: it relays to db-b, never to network-a's db-a.
        let text = r#"
node: { name: gb, network: network-b, east_west_gateway: { workload: gw }, certificates: { file_ca: { dir: /tmp/ca } } }
workloads:
  - { uid: gw, name: eastwest, namespace: istio-system, service_account: eastwest, addresses: [10.77.9.2], node: gb }
  - { uid: db-a, name: db-a, namespace: data, addresses: [10.77.1.2], node: a2, network: network-a, services: { "data/db.data.svc.cluster.local": { 80: 8080 } } }
  - { uid: db-b, name: db-b, namespace: data, addresses: [10.77.2.1], node: b1, services: { "data/db.data.svc.cluster.local": { 80: 9090 } } }
services:
  - { name: db, namespace: data, hostname: db.data.svc.cluster.local, vips: [10.96.77.1], ports: { 80: 8080 } }
"#;
        let m = Model::from_config(&Config::parse(text, "t").unwrap());
        let gw = m.workload_by_uid("gw").unwrap().clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..10 {
            let (svc, w, hbone) = m
                .gateway_target(&gw, "db.data.svc.cluster.local", 80, &mut rng)
                .unwrap();
            assert_eq!((svc.name.as_str(), w.uid.as_str()), ("db", "db-b"));
            assert_eq!(hbone, "10.77.2.1:15008".parse().unwrap());
        }
        assert_eq!(
            m.gateway_target(&gw, "nope.data.svc.cluster.local", 80, &mut rng)
                .unwrap_err(),
            SelectError::UnknownService("nope.data.svc.cluster.local".into())
        );
        assert!(matches!(
            m.gateway_target(&gw, "db.data.svc.cluster.local", 81, &mut rng),
            Err(SelectError::NoSuchPort { .. })
        ));
        // Destination side: the workload's own port map gives the target; a workload that does
        // not back the service is refused.
        let db_b = m.workload_by_uid("db-b").unwrap();
        let (_, port) = m
            .service_target("db.data.svc.cluster.local", 80, db_b)
            .unwrap();
        assert_eq!(port, 9090);
        assert!(matches!(
            m.service_target("db.data.svc.cluster.local", 80, &gw),
            Err(SelectError::NotAnEndpoint { .. })
        ));
    }
}
