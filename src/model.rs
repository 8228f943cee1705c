//! The mesh model the data path reads: workloads and services indexed by address, built from the
//! config once per (re)load, plus outbound destination selection (docs/model.md "Outbound destination
//! selection"). Everything here is pure: no I/O, deterministic given the random source.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::Rng;

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
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoHealthyEndpoint { service: String, port: u16 },
    #[error("service {service} has no port {port}")]
    NoSuchPort { service: String, port: u16 },
    #[error("destination {0} is not in the mesh registry and registry_only is set")]
    RegistryOnly(SocketAddr),
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
}

impl Model {
    pub fn from_config(cfg: &Config) -> Model {
        Model::build(&cfg.node, &cfg.workloads, &cfg.services)
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
            });
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
                ports: s.ports.iter().map(|(a, b)| (*a, *b)).collect(),
                subject_alt_names: s.subject_alt_names.iter().map(|x| x.0.clone()).collect(),
                mode: s.load_balancing.mode,
                routing_preference: s.load_balancing.routing_preference.clone(),
                waypoint: s.waypoint.as_ref().map(|u| u.0.clone()),
                traffic_policy: s.traffic_policy.clone(),
                app_protocols: s.app_protocols.iter().map(|(p, a)| (*p, *a)).collect(),
                endpoints,
            });
            for vip in &svc.vips {
                if services_by_vip.contains_key(vip) {
                    tracing::warn!(vip = %vip, ignored = %key, "two services claim one VIP; keeping the first");
                    continue;
                }
                services_by_vip.insert(*vip, svc.clone());
            }
            services.push(svc);
        }
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
        }
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads_by_uid.get(uid)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads_by_ip.get(&ip)
    }

    /// The service a Host header names: its hostname, or `name.namespace[.svc]`.
    pub fn service_by_host(&self, host: &str) -> Option<&Arc<Service>> {
        self.services_by_host.get(host)
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
            return Ok(route);
        }
        if let Some(svc) = self.service_by_vip(dst.ip()) {
            let default_target = *svc.ports.get(&dst.port()).ok_or(SelectError::NoSuchPort {
                service: svc.key(),
                port: dst.port(),
            })?;
            let key = svc.key();
            let candidates: Vec<(&Arc<Workload>, u16)> = svc
                .endpoints
                .iter()
                .filter(|w| w.healthy && !w.addresses.is_empty() && !excluded(w))
                .filter_map(|w| {
                    let target = match w.services.get(&key) {
                        Some(map) if !map.is_empty() => *map.get(&dst.port())?,
                        _ => default_target,
                    };
                    Some((w, target))
                })
                .collect();
            let candidates = prefer_closest(source, svc, candidates);
            let (w, target) =
                pick_weighted(&candidates, rng).ok_or_else(|| SelectError::NoHealthyEndpoint {
                    service: key.clone(),
                    port: dst.port(),
                })?;
            let ip = pick_address(&w.addresses, dst.ip());
            return Ok(self.route_to(w.clone(), SocketAddr::new(ip, target), Some(svc.clone())));
        }
        if let Some(w) = self.workload_by_ip(dst.ip()) {
            return Ok(self.route_to(w.clone(), dst, None));
        }
        if self.registry_only {
            return Err(SelectError::RegistryOnly(dst));
        }
        Ok(Route::Passthrough { addr: dst })
    }

    /// docs/model.md steps 2 and 3: a Service VIP or workload IP that names a waypoint is sent to
    /// that waypoint, with the ORIGINAL destination as `:authority` so the waypoint can apply the
    /// destination's L7 rules. Traffic from the waypoint itself goes on to the destination.
    fn via_waypoint(&self, source: &Workload, dst: SocketAddr) -> Option<Route> {
        let (uid, service) = match self.service_by_vip(dst.ip()) {
            Some(svc) => (svc.waypoint.as_ref()?, Some(svc.clone())),
            None => (self.workload_by_ip(dst.ip())?.waypoint.as_ref()?, None),
        };
        if *uid == source.uid {
            return None;
        }
        let wp = self.workload_by_uid(uid)?;
        let ip = pick_address(&wp.addresses, dst.ip());
        Some(Route::Hbone {
            hbone_addr: SocketAddr::new(ip, self.hbone_port),
            authority: dst,
            expected: vec![wp.identity.clone()],
            destination: wp.clone(),
            service,
        })
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

/// Every name a service answers to; the first service to claim a name keeps it.
fn host_index(services: &[Arc<Service>]) -> HashMap<String, Arc<Service>> {
    let mut index = HashMap::new();
    for s in services {
        index.entry(s.hostname.clone()).or_insert_with(|| s.clone());
    }
    for s in services {
        for alias in [
            format!("{}.{}", s.name, s.namespace),
            format!("{}.{}.svc", s.name, s.namespace),
        ] {
            index.entry(alias).or_insert_with(|| s.clone());
        }
    }
    index
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
}
