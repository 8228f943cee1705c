//! Istio's xDS resources → the same config structs the file gives (`WorkloadConfig`,
//! `ServiceConfig`, `AuthorizationPolicy`), so one `Model` and one policy engine serve both
//! sources. Every check a file entry gets, a resource gets too; a failure names the resource
//! and the field (it becomes the NACK's `error_detail`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use zmesh_proto::istio::security as sec;
use zmesh_proto::istio::workload as wl;

use crate::config::networks::{GatewayTarget, NetworkGatewayRef};
use crate::config::{
    AppTunnelProtocol, ApplicationTunnel, BoundedString, HealthStatus, LoadBalancing,
    LoadBalancingMode, Locality, RoutingScope, ServiceConfig, SpiffeIdString, TunnelProtocol,
    WorkloadConfig,
};
use crate::identity::SpiffeId;
use crate::policy::{AuthorizationPolicy, BrokenPolicy, PolicyError, Scope};

/// Longest string accepted in any field (as for the file).
const MAX_STRING: usize = 4096;
/// The default service account when a workload leaves it out.
const DEFAULT_SA: &str = "default";

/// Why one resource was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {field}: {reason}")]
pub struct ResourceError {
    pub resource: String,
    pub field: String,
    pub reason: String,
}

fn err(resource: &str, field: impl Into<String>, reason: impl Into<String>) -> ResourceError {
    ResourceError {
        resource: resource.to_string(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// Where a workload or service sends its traffic for L7: resolved to a workload uid when the
/// model is built, because the waypoint arrives as a resource of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaypointRef {
    Ip(IpAddr),
    /// `namespace/hostname` of the waypoint's service.
    Service(String),
}

/// A workload as the model needs it, plus what is resolved against the other resources.
#[derive(Debug, Clone)]
pub struct XdsWorkload {
    pub config: WorkloadConfig,
    pub waypoint: Option<WaypointRef>,
    /// `namespace/name` of the WORKLOAD_SELECTOR policies that select this workload.
    pub policies: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct XdsService {
    pub config: ServiceConfig,
    pub waypoint: Option<WaypointRef>,
}

#[derive(Debug, Clone)]
pub enum AddressEntry {
    Workload(XdsWorkload),
    Service(XdsService),
}

/// A policy as received: valid (its selector filled in when the model is built) or broken
/// (enforced as deny-all over what could be read of its scope, as a broken file policy is).
#[derive(Debug, Clone)]
pub enum PolicyItem {
    Valid(AuthorizationPolicy),
    Broken(BrokenPolicy),
}

fn bounded(resource: &str, field: &str, s: &str) -> Result<BoundedString, ResourceError> {
    if s.len() > MAX_STRING {
        return Err(err(
            resource,
            field,
            format!("{} bytes is over the {MAX_STRING}-byte limit", s.len()),
        ));
    }
    Ok(BoundedString(s.to_string()))
}

fn ip(resource: &str, field: &str, b: &[u8]) -> Result<IpAddr, ResourceError> {
    match b.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(b).expect("length checked"),
        )),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(b).expect("length checked"),
        )),
        n => Err(err(
            resource,
            field,
            format!("{n} bytes is not an IPv4 (4) or IPv6 (16) address"),
        )),
    }
}

fn port(resource: &str, field: &str, p: u32) -> Result<u16, ResourceError> {
    match u16::try_from(p) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(err(resource, field, format!("{p} is not a TCP port"))),
    }
}

/// Istio's `application_tunnel`: PROXY or NONE, and a port (0: the CONNECT's target port).
fn application_tunnel(
    resource: &str,
    t: &Option<wl::ApplicationTunnel>,
) -> Result<Option<ApplicationTunnel>, ResourceError> {
    let Some(t) = t else { return Ok(None) };
    use wl::application_tunnel::Protocol;
    let protocol = match Protocol::try_from(t.protocol) {
        Ok(Protocol::None) => AppTunnelProtocol::None,
        Ok(Protocol::Proxy) => AppTunnelProtocol::Proxy,
        Err(_) => {
            return Err(err(
                resource,
                "application_tunnel.protocol",
                format!("{} is not an application tunnel protocol", t.protocol),
            ))
        }
    };
    let port = match t.port {
        0 => 0,
        p => port(resource, "application_tunnel.port", p)?,
    };
    Ok(Some(ApplicationTunnel { protocol, port }))
}

fn network_gateway(
    resource: &str,
    g: &Option<wl::GatewayAddress>,
) -> Result<Option<NetworkGatewayRef>, ResourceError> {
    let Some(target) = waypoint(resource, "network_gateway", g)? else {
        return Ok(None);
    };
    let port = match g.as_ref().map_or(0, |g| g.hbone_mtls_port) {
        0 => 15008,
        p => port(resource, "network_gateway.hbone_mtls_port", p)?,
    };
    let target = match target {
        WaypointRef::Ip(ip) => GatewayTarget::Ip(ip),
        WaypointRef::Service(key) => GatewayTarget::Service(key),
    };
    Ok(Some(NetworkGatewayRef { target, port }))
}

fn waypoint(
    resource: &str,
    field: &str,
    g: &Option<wl::GatewayAddress>,
) -> Result<Option<WaypointRef>, ResourceError> {
    let Some(g) = g else { return Ok(None) };
    match &g.destination {
        Some(wl::gateway_address::Destination::Address(a)) => Ok(Some(WaypointRef::Ip(ip(
            resource,
            &format!("{field}.address.address"),
            &a.address,
        )?))),
        Some(wl::gateway_address::Destination::Hostname(h)) => {
            if h.namespace.is_empty() || h.hostname.is_empty() {
                return Err(err(
                    resource,
                    format!("{field}.hostname"),
                    "needs a namespace and a hostname",
                ));
            }
            Ok(Some(WaypointRef::Service(format!(
                "{}/{}",
                h.namespace, h.hostname
            ))))
        }
        None => Err(err(
            resource,
            field,
            "names neither an address nor a hostname",
        )),
    }
}

/// A `type.googleapis.com/istio.workload.Address` resource.
pub fn address(name: &str, a: &wl::Address) -> Result<AddressEntry, ResourceError> {
    match &a.r#type {
        Some(wl::address::Type::Workload(w)) => workload(name, w).map(AddressEntry::Workload),
        Some(wl::address::Type::Service(s)) => service(name, s).map(AddressEntry::Service),
        None => Err(err(
            name,
            "type",
            "the Address holds neither a workload nor a service",
        )),
    }
}

pub fn workload(name: &str, w: &wl::Workload) -> Result<XdsWorkload, ResourceError> {
    if w.uid.is_empty() {
        return Err(err(name, "uid", "a workload needs a uid"));
    }
    if w.uid != name {
        return Err(err(
            name,
            "uid",
            format!("{:?} differs from the resource name", w.uid),
        ));
    }
    let sa = if w.service_account.is_empty() {
        DEFAULT_SA
    } else {
        &w.service_account
    };
    let td = (!w.trust_domain.is_empty())
        .then(|| bounded(name, "trust_domain", &w.trust_domain))
        .transpose()?;
    if w.namespace.is_empty() {
        return Err(err(name, "namespace", "a workload needs a namespace"));
    }
    SpiffeId::new(
        td.as_deref().unwrap_or(crate::config::DEFAULT_TRUST_DOMAIN),
        &w.namespace,
        sa,
    )
    .map_err(|e| err(name, "service_account", format!("no valid identity: {e}")))?;
    let mut addresses = Vec::with_capacity(w.addresses.len());
    for (i, a) in w.addresses.iter().enumerate() {
        addresses.push(ip(name, &format!("addresses[{i}]"), a)?);
    }
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        if !key.contains('/') {
            return Err(err(
                name,
                format!("services[{key:?}]"),
                "service keys are \"namespace/hostname\"",
            ));
        }
        let mut ports = BTreeMap::new();
        for (i, p) in list.ports.iter().enumerate() {
            let field = format!("services[{key:?}].ports[{i}]");
            let sp = port(name, &format!("{field}.service_port"), p.service_port)?;
            // A target port istiod could not resolve (a named port the pod lacks) is 0: the
            // workload does not serve that service port.
            if p.target_port == 0 {
                continue;
            }
            ports.insert(
                sp,
                port(name, &format!("{field}.target_port"), p.target_port)?,
            );
        }
        services.insert(bounded(name, "services", key)?, ports);
    }
    let workload_type = match wl::WorkloadType::try_from(w.workload_type) {
        Ok(wl::WorkloadType::Deployment) => "deployment",
        Ok(wl::WorkloadType::Cronjob) => "cronjob",
        Ok(wl::WorkloadType::Pod) => "pod",
        Ok(wl::WorkloadType::Job) => "job",
        Err(_) => {
            return Err(err(
                name,
                "workload_type",
                format!("{} is not a workload type", w.workload_type),
            ))
        }
    };
    let protocol = match wl::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(wl::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
        Ok(wl::TunnelProtocol::None) => TunnelProtocol::Tcp,
        Err(_) => {
            return Err(err(
                name,
                "tunnel_protocol",
                format!("{} is not a tunnel protocol", w.tunnel_protocol),
            ))
        }
    };
    let status = match wl::WorkloadStatus::try_from(w.status) {
        Ok(wl::WorkloadStatus::Healthy) => HealthStatus::Healthy,
        _ => HealthStatus::Unhealthy,
    };
    let locality = w.locality.as_ref().map_or(Ok(Locality::default()), |l| {
        Ok::<_, ResourceError>(Locality {
            region: bounded(name, "locality.region", &l.region)?,
            zone: bounded(name, "locality.zone", &l.zone)?,
            subzone: bounded(name, "locality.subzone", &l.subzone)?,
        })
    })?;
    let mut policies = Vec::with_capacity(w.authorization_policies.len());
    for p in &w.authorization_policies {
        policies.push(bounded(name, "authorization_policies", p)?.0);
    }
    let opt = |field: &str, s: &str| (!s.is_empty()).then(|| bounded(name, field, s)).transpose();
    Ok(XdsWorkload {
        config: WorkloadConfig {
            uid: bounded(name, "uid", &w.uid)?,
            name: bounded(name, "name", &w.name)?,
            namespace: bounded(name, "namespace", &w.namespace)?,
            service_account: bounded(name, "service_account", sa)?,
            trust_domain: td,
            addresses,
            node: bounded(name, "node", &w.node)?,
            protocol,
            workload_type: workload_type.into(),
            canonical_name: opt("canonical_name", &w.canonical_name)?,
            canonical_revision: opt("canonical_revision", &w.canonical_revision)?,
            status,
            capacity: w.capacity.map_or(1, |c| c),
            locality,
            services,
            // Resolved against the waypoint's own resource when the model is built.
            waypoint: None,
            application_tunnel: application_tunnel(name, &w.application_tunnel)?,
            network: opt("network", &w.network)?,
            network_gateway: network_gateway(name, &w.network_gateway)?,
        },
        waypoint: waypoint(name, "waypoint", &w.waypoint)?,
        policies,
    })
}

pub fn service(name: &str, s: &wl::Service) -> Result<XdsService, ResourceError> {
    for (field, v) in [("namespace", &s.namespace), ("hostname", &s.hostname)] {
        if v.is_empty() {
            return Err(err(name, field, "a service needs one"));
        }
    }
    let key = format!("{}/{}", s.namespace, s.hostname);
    if key != name {
        return Err(err(
            name,
            "hostname",
            format!("{key:?} differs from the resource name"),
        ));
    }
    let mut vips = Vec::with_capacity(s.addresses.len());
    for (i, a) in s.addresses.iter().enumerate() {
        vips.push(ip(name, &format!("addresses[{i}].address"), &a.address)?);
    }
    let mut ports = BTreeMap::new();
    for (i, p) in s.ports.iter().enumerate() {
        let sp = port(name, &format!("ports[{i}].service_port"), p.service_port)?;
        // An unset target port means "the same as the service port" for the default.
        let tp = if p.target_port == 0 {
            sp
        } else {
            port(name, &format!("ports[{i}].target_port"), p.target_port)?
        };
        ports.insert(sp, tp);
    }
    let mut sans = Vec::with_capacity(s.subject_alt_names.len());
    for (i, san) in s.subject_alt_names.iter().enumerate() {
        let full = if san.starts_with("spiffe://") {
            san.clone()
        } else {
            format!("spiffe://{san}")
        };
        sans.push(SpiffeIdString(SpiffeId::parse(&full).map_err(|e| {
            err(
                name,
                format!("subject_alt_names[{i}]"),
                format!("{san:?}: {e}"),
            )
        })?));
    }
    let load_balancing = match &s.load_balancing {
        None => LoadBalancing::default(),
        Some(lb) => {
            use wl::load_balancing::{Mode, Scope as LbScope};
            let mode = match Mode::try_from(lb.mode) {
                Ok(Mode::UnspecifiedMode) | Ok(Mode::Passthrough) => LoadBalancingMode::Standard,
                Ok(Mode::Strict) => LoadBalancingMode::Strict,
                Ok(Mode::Failover) => LoadBalancingMode::Failover,
                Err(_) => {
                    return Err(err(
                        name,
                        "load_balancing.mode",
                        format!("{} is not a mode", lb.mode),
                    ))
                }
            };
            let mut routing_preference = Vec::new();
            for (i, sc) in lb.routing_preference.iter().enumerate() {
                routing_preference.push(match LbScope::try_from(*sc) {
                    Ok(LbScope::Region) => RoutingScope::Region,
                    Ok(LbScope::Zone) => RoutingScope::Zone,
                    Ok(LbScope::Subzone) => RoutingScope::Subzone,
                    Ok(LbScope::Node) => RoutingScope::Node,
                    Ok(LbScope::Cluster) => RoutingScope::Cluster,
                    // One network per mesh here: every endpoint shares it.
                    Ok(LbScope::Network) => continue,
                    _ => {
                        return Err(err(
                            name,
                            format!("load_balancing.routing_preference[{i}]"),
                            format!("{sc} is not a scope"),
                        ))
                    }
                });
            }
            LoadBalancing {
                mode,
                routing_preference,
            }
        }
    };
    Ok(XdsService {
        config: ServiceConfig {
            name: bounded(name, "name", &s.name)?,
            namespace: bounded(name, "namespace", &s.namespace)?,
            hostname: bounded(name, "hostname", &s.hostname)?,
            vips,
            ports,
            subject_alt_names: sans,
            load_balancing,
            waypoint: None,
            traffic_policy: None,
            app_protocols: BTreeMap::new(),
        },
        waypoint: waypoint(name, "waypoint", &s.waypoint)?,
    })
}

/// A `type.googleapis.com/istio.security.Authorization` resource. A policy that cannot be read
/// is returned as `Broken` (with the error for the NACK): enforced as deny-all over its scope,
/// never dropped, so a bad DENY cannot open what it was meant to close.
pub fn authorization(name: &str, a: &sec::Authorization) -> (PolicyItem, Option<ResourceError>) {
    let scope = match sec::Scope::try_from(a.scope) {
        Ok(sec::Scope::Global) => Some(Scope::Global),
        Ok(sec::Scope::Namespace) => Some(Scope::Namespace),
        // Filled with the selecting workloads when the model is built.
        Ok(sec::Scope::WorkloadSelector) => Some(Scope::WorkloadSelector { workloads: vec![] }),
        Err(_) => None,
    };
    match policy_value(name, a).and_then(|v| {
        serde_yaml::from_value::<AuthorizationPolicy>(v)
            .map_err(|e| err(name, "rules", crate::policy::yaml_message(&e)))
    }) {
        Ok(mut p) => {
            if let Some(s) = scope.clone() {
                p.scope = s;
            }
            if let Some(e) =
                (scope.is_none()).then(|| err(name, "scope", format!("{} is not a scope", a.scope)))
            {
                return broken(name, a, None, e);
            }
            (PolicyItem::Valid(p), None)
        }
        Err(e) => broken(name, a, scope, e),
    }
}

fn broken(
    name: &str,
    a: &sec::Authorization,
    scope: Option<Scope>,
    e: ResourceError,
) -> (PolicyItem, Option<ResourceError>) {
    (
        PolicyItem::Broken(BrokenPolicy {
            name: (!a.name.is_empty()).then(|| a.name.clone()),
            namespace: (!a.namespace.is_empty()).then(|| a.namespace.clone()),
            scope,
            error: PolicyError::Invalid {
                policy: name.to_string(),
                field: e.field.clone(),
                value: String::new(),
                reason: e.reason.clone(),
            },
        }),
        Some(e),
    )
}

/// The policy in the file's YAML shape, so it goes through the file's validation (same checks,
/// same messages). The scope is written as `namespace` and replaced after validation.
fn policy_value(name: &str, a: &sec::Authorization) -> Result<serde_yaml::Value, ResourceError> {
    use serde_yaml::{Mapping, Value};
    let action = match sec::Action::try_from(a.action) {
        Ok(sec::Action::Allow) => "allow",
        Ok(sec::Action::Deny) => "deny",
        Err(_) => {
            return Err(err(
                name,
                "action",
                format!("{} is not an action", a.action),
            ))
        }
    };
    let mut rules = Vec::new();
    for (ri, r) in a.rules.iter().enumerate() {
        let mut clauses = Vec::new();
        for (ci, c) in r.clauses.iter().enumerate() {
            let mut matches = Vec::new();
            for (mi, m) in c.matches.iter().enumerate() {
                let at = format!("rules[{ri}].clauses[{ci}].matches[{mi}]");
                let mut map = Mapping::new();
                let mut put = |k: &str, v: Vec<Value>| {
                    if !v.is_empty() {
                        map.insert(Value::from(k), Value::Sequence(v));
                    }
                };
                let strings = |field: &str, l: &[sec::StringMatch]| {
                    l.iter()
                        .enumerate()
                        .map(|(i, s)| string_match(name, &format!("{at}.{field}[{i}]"), s))
                        .collect::<Result<Vec<_>, _>>()
                };
                put("namespaces", strings("namespaces", &m.namespaces)?);
                put(
                    "not_namespaces",
                    strings("not_namespaces", &m.not_namespaces)?,
                );
                put("principals", strings("principals", &m.principals)?);
                put(
                    "not_principals",
                    strings("not_principals", &m.not_principals)?,
                );
                let cidrs = |field: &str, l: &[sec::Address]| {
                    l.iter()
                        .enumerate()
                        .map(|(i, x)| {
                            let f = format!("{at}.{field}[{i}]");
                            let addr = ip(name, &f, &x.address)?;
                            Ok(Value::from(format!("{addr}/{}", x.length)))
                        })
                        .collect::<Result<Vec<_>, ResourceError>>()
                };
                put("source_ips", cidrs("source_ips", &m.source_ips)?);
                put(
                    "not_source_ips",
                    cidrs("not_source_ips", &m.not_source_ips)?,
                );
                put(
                    "destination_ips",
                    cidrs("destination_ips", &m.destination_ips)?,
                );
                put(
                    "not_destination_ips",
                    cidrs("not_destination_ips", &m.not_destination_ips)?,
                );
                let ports = |l: &[u32]| l.iter().map(|p| Value::from(u64::from(*p))).collect();
                put("destination_ports", ports(&m.destination_ports));
                put("not_destination_ports", ports(&m.not_destination_ports));
                let sas = |l: &[sec::ServiceAccountMatch]| {
                    l.iter()
                        .map(|s| Value::from(format!("{}/{}", s.namespace, s.service_account)))
                        .collect()
                };
                put("service_accounts", sas(&m.service_accounts));
                put("not_service_accounts", sas(&m.not_service_accounts));
                matches.push(Value::Mapping(map));
            }
            let mut cm = Mapping::new();
            cm.insert("matches".into(), Value::Sequence(matches));
            clauses.push(Value::Mapping(cm));
        }
        let mut rm = Mapping::new();
        rm.insert("clauses".into(), Value::Sequence(clauses));
        rules.push(Value::Mapping(rm));
    }
    let mut p = Mapping::new();
    p.insert("name".into(), a.name.clone().into());
    p.insert("namespace".into(), a.namespace.clone().into());
    p.insert("action".into(), action.into());
    p.insert("dry_run".into(), a.dry_run.into());
    p.insert("rules".into(), Value::Sequence(rules));
    Ok(Value::Mapping(p))
}

/// Istio's typed string match in the file's written form (`x`, `x*`, `*x`, `*`). A value that
/// itself holds `*` cannot be written that way and is refused.
fn string_match(
    name: &str,
    field: &str,
    s: &sec::StringMatch,
) -> Result<serde_yaml::Value, ResourceError> {
    use sec::string_match::MatchType;
    let text = match &s.match_type {
        Some(MatchType::Exact(v)) => v.clone(),
        Some(MatchType::Prefix(v)) => format!("{v}*"),
        Some(MatchType::Suffix(v)) => format!("*{v}"),
        Some(MatchType::Presence(())) => "*".into(),
        None => return Err(err(name, field, "an empty string match")),
    };
    let inner = match &s.match_type {
        Some(MatchType::Exact(v)) | Some(MatchType::Prefix(v)) | Some(MatchType::Suffix(v)) => v,
        _ => "",
    };
    if inner.contains('*') {
        return Err(err(
            name,
            field,
            format!("{inner:?} holds '*', which cannot be matched literally"),
        ));
    }
    Ok(text.into())
}
