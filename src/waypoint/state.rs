//! What the waypoint knows, built from its config file (`WpState`): the model, L4 and HTTP
//! policies, routes and JWT validators. A reload builds a new one and swaps it in whole.
//!
//! Also what a CONNECT's original destination addresses (`Target`), and so which policies
//! judge a flow: the services behind it, and whether a request's Host may name it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderName;

use super::config::{HttpPolicyConfig, RouteConfig};
use super::flow::Downstream;
use super::jwt::{Jwks, Validator};
use super::l7::{authorize_tcp, TcpView};
use super::server::WaypointError;
use super::transcode::Transcoder;
use crate::config::Config;
use crate::model::{Model, Service, Workload};
use crate::policy::PolicySet;

/// One RequestAuthentication: required?, the validator, claim → header copies.
/// The claim → header copies are parsed into header names once, at load.
pub(super) type JwtRule = (bool, Validator, Vec<(String, HeaderName)>);

/// The live model and the L7 configuration derived from it.
pub struct WpState {
    pub model: Arc<Model>,
    pub l4: Arc<PolicySet>,
    pub(super) routes: HashMap<String, Vec<RouteConfig>>,
    /// `namespace/hostname` of each of the model's services, in the model's order: built once,
    /// not per request.
    service_keys: Vec<String>,
    http_policies: Vec<HttpPolicyConfig>,
    auth: HashMap<String, Vec<JwtRule>>,
    /// gRPC↔JSON transcoding by service key, compiled from the descriptor sets at load.
    pub(super) transcoders: HashMap<String, Arc<Transcoder>>,
}

impl WpState {
    pub fn from_config(cfg: &Config) -> Result<WpState, WaypointError> {
        let mut routes: HashMap<String, Vec<RouteConfig>> = HashMap::new();
        let mut transcoders = HashMap::new();
        for r in &cfg.routes {
            routes.entry(r.service.clone()).or_default().push(r.clone());
            if let Some(t) = &r.grpc_transcoding {
                let bad = |detail: String| WaypointError::Transcoding {
                    route: r.name.clone(),
                    detail,
                };
                let compiled = Transcoder::load(t).map_err(|e| bad(e.to_string()))?;
                if transcoders
                    .insert(r.service.clone(), Arc::new(compiled))
                    .is_some()
                {
                    return Err(bad(format!(
                        "service {} already has grpc_transcoding in another route",
                        r.service
                    )));
                }
            }
        }
        let mut auth: HashMap<String, Vec<_>> = HashMap::new();
        for a in &cfg.request_authentication {
            let text = match (&a.jwks, &a.jwks_file) {
                (Some(j), _) => j.clone(),
                (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| WaypointError::Jwks {
                    name: a.name.clone(),
                    detail: format!("{}: {e}", f.display()),
                })?,
                (None, None) => String::new(),
            };
            let jwks = Jwks::parse(&text).map_err(|detail| WaypointError::Jwks {
                name: a.name.clone(),
                detail,
            })?;
            auth.entry(a.service.clone()).or_default().push((
                a.required,
                Validator {
                    issuer: a.issuer.clone(),
                    audiences: a.audiences.clone(),
                    jwks,
                },
                // A name that is no valid header cannot be set; it is left out here as it
                // was left out per request before.
                a.claims_to_headers
                    .iter()
                    .filter_map(|(c, h)| Some((c.clone(), HeaderName::try_from(h.as_str()).ok()?)))
                    .collect(),
            ));
        }
        let model = Arc::new(Model::from_config(cfg));
        let service_keys = model.services().iter().map(|s| s.key()).collect();
        Ok(WpState {
            model,
            l4: Arc::new(cfg.policy_set()),
            routes,
            service_keys,
            http_policies: cfg.http_policies.clone(),
            auth,
            transcoders,
        })
    }
}

/// What a CONNECT's `:authority` (the original destination) addresses, and so which policies
/// judge everything sent through that stream. It is fixed by the CONNECT, never by anything the
/// client says inside the stream (a Host header, HTTP/2 `:authority`): those come from the
/// client, the CONNECT target is what the client's node captured and what the stream will be
/// forwarded to (Istio ambient waypoints select by original destination the same way).
pub(super) struct Target {
    /// A service VIP: that service. A pod IP: every service the pod backs.
    pub(super) services: Vec<Arc<Service>>,
    /// The services' `namespace/hostname` keys, in the same order.
    keys: Vec<String>,
    /// A pod IP: the pod.
    pub(super) workload: Option<Arc<Workload>>,
    /// Namespaces whose service-less (namespace-wide) policies apply: the services' and, for a
    /// pod IP, the pod's.
    namespaces: Vec<String>,
}

impl WpState {
    pub(super) fn target(&self, dst: SocketAddr) -> Target {
        let (services, keys, workload): (Vec<_>, Vec<_>, _) =
            match self.model.service_by_vip(dst.ip()) {
                Some(s) => (vec![s.clone()], vec![s.key()], None),
                None => match self.model.workload_by_ip(dst.ip()) {
                    Some(w) => {
                        // The pod's services in the model's order, by their prebuilt keys.
                        let (services, keys) = self
                            .model
                            .services()
                            .iter()
                            .zip(&self.service_keys)
                            .filter(|(_, k)| w.services.contains_key(*k))
                            .map(|(s, k)| (s.clone(), k.clone()))
                            .unzip();
                        (services, keys, Some(w.clone()))
                    }
                    // `stream` refuses a CONNECT to anything else (400); nothing to judge by.
                    None => (Vec::new(), Vec::new(), None),
                },
            };
        let mut namespaces: Vec<String> = services.iter().map(|s| s.namespace.clone()).collect();
        namespaces.extend(workload.iter().map(|w| w.namespace.clone()));
        namespaces.sort();
        namespaces.dedup();
        Target {
            services,
            keys,
            workload,
            namespaces,
        }
    }

    /// Every HTTP policy that applies to the target: those of its services and the
    /// namespace-wide ones of its namespaces.
    pub(super) fn policies(&self, t: &Target) -> Vec<&HttpPolicyConfig> {
        self.http_policies
            .iter()
            .filter(|p| match &p.service {
                Some(key) => t.keys.contains(key),
                None => t.namespaces.contains(&p.namespace),
            })
            .collect()
    }

    /// Every JWT validator of the target's services.
    pub(super) fn validators(&self, t: &Target) -> Vec<&JwtRule> {
        t.keys
            .iter()
            .filter_map(|k| self.auth.get(k))
            .flatten()
            .collect()
    }

    /// The TCP reading of the target's policies (l7's module docs): `Err` is why the flow is
    /// denied.
    pub(super) fn judge_tcp(&self, t: &Target, down: &Downstream) -> Result<(), String> {
        if self.validators(t).iter().any(|(required, _, _)| *required) {
            return Err("a required JWT cannot be presented over TCP".into());
        }
        let view = TcpView {
            source: Some(&down.client),
            source_ip: down.peer.ip(),
            port: down.dst.port(),
        };
        let d = authorize_tcp(&self.policies(t), &view);
        if d.allowed {
            return Ok(());
        }
        Err(format!(
            "denied as TCP by {}",
            d.policy
                .as_deref()
                .unwrap_or("no matching L4-only ALLOW rule")
        ))
    }
}

/// Checks a request's host (Host, or HTTP/2 `:authority`) against the CONNECT target.
///
/// - Empty, or naming nothing the mesh knows (a public name, garbage): judged by the target's
///   policies like any other request to it.
/// - Naming the target (a service's hostname, `name.namespace[.svc]`, its short name in its
///   namespace, a VIP, the pod's IP, or an IP of one of the service's endpoints): `Ok`, with the
///   service it names, if any.
/// - Naming another service or another workload of the mesh: `Err`, answered **421
///   Misdirected Request**. Such a request can be neither judged by the named service's
///   policies (the stream goes to the CONNECT target, and a Host must not choose weaker
///   policies) nor served as if it were for the target without silently misrouting it.
pub(super) fn check_host(
    model: &Model,
    host: &str,
    t: &Target,
) -> Result<Option<Arc<Service>>, String> {
    if host.is_empty() {
        return Ok(None);
    }
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        // A client node's DNS proxy may have handed out the service's auto VIP.
        if let Some(s) = t
            .services
            .iter()
            .find(|s| s.vips.contains(&ip) || s.auto_vip == Some(ip))
        {
            return Ok(Some(s.clone()));
        }
        let is_target_pod = t.workload.iter().any(|w| w.addresses.contains(&ip))
            || t.services
                .iter()
                .any(|s| s.endpoints.iter().any(|w| w.addresses.contains(&ip)));
        if is_target_pod {
            return Ok(None);
        }
        if model.service_by_vip(ip).is_some() || model.workload_by_ip(ip).is_some() {
            return Err(format!(
                "host {ip} is another service or workload than the CONNECT target"
            ));
        }
        return Ok(None);
    }
    // A bare name is a service of the target's namespace, as cluster DNS resolves it.
    let named = model.service_by_host(host).or_else(|| {
        (!host.contains('.')).then_some(()).and_then(|()| {
            t.namespaces
                .iter()
                .find_map(|ns| model.service_by_host(&format!("{host}.{ns}")))
        })
    });
    match named {
        Some(s) if t.services.iter().any(|own| Arc::ptr_eq(own, s)) => Ok(Some(s.clone())),
        Some(s) => Err(format!(
            "host {host:?} names service {}, not the CONNECT target",
            s.key()
        )),
        None => Ok(None),
    }
}

/// The service whose routes, metrics and limits a request uses: the VIP's service; for a pod
/// IP, the one of the pod's services the host names, else its only service, else none.
pub(super) fn primary_service(t: &Target, named: Option<Arc<Service>>) -> Option<Arc<Service>> {
    named.or_else(|| match t.services.as_slice() {
        [only] => Some(only.clone()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// `a` (backed by v1 and v2) and `b` (v1) in `shop`, `c` in `other`, `lone` backs nothing;
    /// one DENY per service plus a namespace-wide one in `shop`.
    fn state() -> WpState {
        let deny = |name: &str, ns: &str, svc: &str| {
            let svc = if svc.is_empty() {
                String::new()
            } else {
                format!("service: {ns}/{svc}.{ns}.svc.cluster.local, ")
            };
            format!("  - {{ name: {name}, namespace: {ns}, {svc}action: deny, rules: [{{ to: [{{ paths: [/x] }}] }}] }}\n")
        };
        let mut text = String::from(
            r#"node: { name: n, certificates: { file_ca: { dir: /tmp/ca } } }
workloads:
  - { uid: client, name: client, namespace: shop, addresses: [10.0.0.1], node: n }
  - { uid: v1, name: v1, namespace: shop, addresses: [10.0.1.1], node: n, services: { shop/a.shop.svc.cluster.local: {}, shop/b.shop.svc.cluster.local: {} } }
  - { uid: v2, name: v2, namespace: shop, addresses: [10.0.1.2], node: n, services: { shop/a.shop.svc.cluster.local: {} } }
  - { uid: o, name: o, namespace: other, addresses: [10.0.2.1], node: n, services: { other/c.other.svc.cluster.local: {} } }
  - { uid: lone, name: lone, namespace: shop, addresses: [10.0.3.1], node: n }
services:
  - { name: a, namespace: shop, hostname: a.shop.svc.cluster.local, vips: [10.96.0.1], ports: { 80: 8080 } }
  - { name: b, namespace: shop, hostname: b.shop.svc.cluster.local, vips: [10.96.0.2], ports: { 80: 8080 } }
  - { name: c, namespace: other, hostname: c.other.svc.cluster.local, vips: [10.96.0.3], ports: { 80: 8080 } }
http_policies:
"#,
        );
        text += &deny("pa", "shop", "a");
        text += &deny("pb", "shop", "b");
        text += &deny("ns", "shop", "");
        text += &deny("pc", "other", "c");
        WpState::from_config(&Config::parse(&text, "t").unwrap()).unwrap()
    }

    fn names(t: &Target) -> Vec<&str> {
        t.services.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn the_connect_target_fixes_the_services_and_policies() {
        let st = state();
        // (CONNECT target, its services, the policies that judge it)
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("10.96.0.1:80", &["a"], &["pa", "ns"]),
            ("10.96.0.2:80", &["b"], &["pb", "ns"]),
            ("10.0.1.1:8080", &["a", "b"], &["pa", "pb", "ns"]),
            ("10.0.1.2:8080", &["a"], &["pa", "ns"]),
            ("10.0.3.1:8080", &[], &["ns"]),
            ("10.0.2.1:8080", &["c"], &["pc"]),
        ];
        for (dst, services, policies) in cases {
            let t = st.target(dst.parse().unwrap());
            assert_eq!(names(&t), *services, "{dst}");
            let got: Vec<&str> = st.policies(&t).iter().map(|p| p.name.as_str()).collect();
            assert_eq!(got, *policies, "{dst}");
        }
    }

    #[test]
    fn an_auto_vip_authority_names_its_service_even_with_dns_off_at_the_waypoint() {
        // The waypoint's own DNS proxy is off; a client node's proxy handed out the auto VIP.
        let text = r#"node: { name: n, certificates: { file_ca: { dir: /tmp/ca } } }
workloads:
  - { uid: e, name: e, namespace: shop, addresses: [10.0.4.1], node: n, services: { shop/api.example.com: {} } }
  - { uid: f, name: f, namespace: shop, addresses: [10.0.4.2], node: n, services: { shop/db.example.com: {} } }
services:
  - { name: api, namespace: shop, hostname: api.example.com, ports: { 443: 443 } }
  - { name: db, namespace: shop, hostname: db.example.com, ports: { 443: 443 } }
"#;
        let st = WpState::from_config(&Config::parse(text, "t").unwrap()).unwrap();
        let vip = |h: &str| {
            st.model
                .service_by_host(h)
                .unwrap()
                .auto_vip
                .expect("allocated")
        };
        let (api, db) = (vip("api.example.com"), vip("db.example.com"));
        let t = st.target(SocketAddr::new(api, 443));
        assert_eq!(names(&t), ["api"]);
        let named = check_host(&st.model, &api.to_string(), &t).unwrap();
        assert_eq!(named.map(|s| s.name.clone()).as_deref(), Some("api"));
        // Another service's auto VIP is still misdirected.
        assert!(check_host(&st.model, &db.to_string(), &t).is_err());
    }

    #[test]
    fn a_host_may_name_the_target_or_nothing_known_never_another_destination() {
        let st = state();
        let m = &st.model;
        let vip_a = st.target("10.96.0.1:80".parse().unwrap());
        let pod_v1 = st.target("10.0.1.1:8080".parse().unwrap());
        // (target, host, Ok(service named) or Err = misdirected)
        type Case<'a> = (&'a Target, &'a str, Result<Option<&'a str>, ()>);
        let cases: Vec<Case<'_>> = vec![
            (&vip_a, "", Ok(None)),
            (&vip_a, "a.shop.svc.cluster.local", Ok(Some("a"))),
            (&vip_a, "a.shop.svc", Ok(Some("a"))),
            (&vip_a, "a.shop", Ok(Some("a"))),
            (&vip_a, "a", Ok(Some("a"))),
            (&vip_a, "10.96.0.1", Ok(Some("a"))),
            (&vip_a, "10.0.1.1", Ok(None)),
            (&vip_a, "10.0.1.2", Ok(None)),
            (&vip_a, "evil.example", Ok(None)),
            (&vip_a, "10.9.9.9", Ok(None)),
            (&vip_a, "c", Ok(None)),
            (&vip_a, "10.0.0.1", Err(())),
            (&vip_a, "10.0.3.1", Err(())),
            (&vip_a, "10.0.2.1", Err(())),
            (&vip_a, "b", Err(())),
            (&vip_a, "b.shop", Err(())),
            (&vip_a, "10.96.0.2", Err(())),
            (&vip_a, "c.other", Err(())),
            (&pod_v1, "10.0.1.1", Ok(None)),
            (&pod_v1, "a", Ok(Some("a"))),
            (&pod_v1, "b.shop", Ok(Some("b"))),
            (&pod_v1, "10.96.0.2", Ok(Some("b"))),
            (&pod_v1, "", Ok(None)),
            (&pod_v1, "garbage", Ok(None)),
            (&pod_v1, "10.0.0.1", Err(())),
            (&pod_v1, "c.other", Err(())),
            (&pod_v1, "10.96.0.3", Err(())),
        ];
        for (t, host, want) in cases {
            let got = check_host(m, host, t);
            let got = got
                .as_ref()
                .map(|s| s.as_ref().map(|s| s.name.as_str()))
                .map_err(|_| ());
            assert_eq!(got, want, "{host:?} to {:?}", names(t));
        }
    }
}
