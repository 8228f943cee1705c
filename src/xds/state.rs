//! What the xDS client holds: every accepted resource by type and name, with its version, and
//! the model and policy set built from them.

use std::collections::{BTreeMap, HashMap};

use crate::config::{BoundedString, NodeConfig};
use crate::model::Model;
use crate::policy::{PolicyEntry, PolicySet, Scope};

use super::convert::{AddressEntry, PolicyItem, WaypointRef};

/// One accepted resource and the version the control plane gave it.
#[derive(Debug, Clone)]
pub struct Held<T> {
    pub version: String,
    pub value: T,
}

/// Accepted resources of both types. BTreeMaps: the model is built in name order, so "the first
/// of two workloads claiming one address" is the same on every node and every rebuild.
#[derive(Debug, Default)]
pub struct Store {
    pub addresses: BTreeMap<String, Held<AddressEntry>>,
    pub policies: BTreeMap<String, Held<PolicyItem>>,
}

impl Store {
    /// name → version of the resources held of `type_url`, for `initial_resource_versions`.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        fn of<T>(m: &BTreeMap<String, Held<T>>) -> HashMap<String, String> {
            m.iter()
                .map(|(k, v)| (k.clone(), v.version.clone()))
                .collect()
        }
        if type_url == zmesh_proto::type_url::ADDRESS {
            of(&self.addresses)
        } else {
            of(&self.policies)
        }
    }

    /// The model and policies these resources describe, for the node `node`.
    pub fn build(&self, node: &NodeConfig) -> (Model, PolicySet) {
        (self.model(node), self.policy_set())
    }

    /// The model of the held workloads and services. Waypoints are resolved to the uid of the
    /// workload at their address (or the first endpoint of their service); one that resolves to
    /// nothing stays as a uid no workload has, so traffic to what it fronts fails instead of
    /// skipping the waypoint (fail closed).
    pub fn model(&self, node: &NodeConfig) -> Model {
        let mut by_ip = HashMap::new();
        let mut by_service: HashMap<&str, &str> = HashMap::new();
        for e in self.addresses.values() {
            if let AddressEntry::Workload(w) = &e.value {
                for ip in &w.config.addresses {
                    by_ip.entry(*ip).or_insert(w.config.uid.0.as_str());
                }
                for key in w.config.services.keys() {
                    by_service
                        .entry(key.0.as_str())
                        .or_insert(w.config.uid.0.as_str());
                }
            }
        }
        let resolve = |r: &Option<WaypointRef>| -> Option<BoundedString> {
            let r = r.as_ref()?;
            let uid = match r {
                WaypointRef::Ip(ip) => by_ip.get(ip).map(|u| u.to_string()),
                WaypointRef::Service(key) => by_service.get(key.as_str()).map(|u| u.to_string()),
            };
            Some(BoundedString(uid.unwrap_or_else(|| {
                let what = match r {
                    WaypointRef::Ip(ip) => ip.to_string(),
                    WaypointRef::Service(k) => k.clone(),
                };
                format!("unresolved-waypoint:{what}")
            })))
        };
        let mut workloads = Vec::new();
        let mut services = Vec::new();
        for e in self.addresses.values() {
            match &e.value {
                AddressEntry::Workload(w) => {
                    let mut c = w.config.clone();
                    c.waypoint = resolve(&w.waypoint);
                    workloads.push(c);
                }
                AddressEntry::Service(s) => {
                    let mut c = s.config.clone();
                    c.waypoint = resolve(&s.waypoint);
                    services.push(c);
                }
            }
        }
        Model::build(node, &workloads, &services)
    }

    /// The policy set of the held policies; a WORKLOAD_SELECTOR policy applies to the workloads
    /// whose `authorization_policies` name it, in whatever namespace each is (istiod's mesh-wide
    /// STRICT policy lives in the root namespace and is named by workloads everywhere).
    pub fn policy_set(&self) -> PolicySet {
        let mut selected: HashMap<&str, Vec<(String, String)>> = HashMap::new();
        for e in self.addresses.values() {
            if let AddressEntry::Workload(w) = &e.value {
                for p in &w.policies {
                    selected
                        .entry(p.as_str())
                        .or_default()
                        .push((w.config.namespace.0.clone(), w.config.name.0.clone()));
                }
            }
        }
        let select = |name: &str, scope: Option<&mut Scope>| {
            if let Some(s @ Scope::WorkloadSelector { .. }) = scope {
                *s = Scope::Workloads(selected.get(name).cloned().unwrap_or_default());
            }
        };
        let entries = self
            .policies
            .iter()
            .map(|(name, held)| match &held.value {
                PolicyItem::Valid(p) => {
                    let mut p = p.clone();
                    select(name, Some(&mut p.scope));
                    PolicyEntry::Valid(p)
                }
                PolicyItem::Broken(b) => {
                    let mut b = b.clone();
                    select(name, b.scope.as_mut());
                    PolicyEntry::Broken(b)
                }
            })
            .collect();
        PolicySet::new(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Connection, WorkloadRef};
    use crate::xds::convert;
    use zmesh_proto::istio::security as sec;
    use zmesh_proto::istio::workload as wl;

    fn node() -> NodeConfig {
        crate::config::Config::parse(
            "node:\n  name: n1\n  certificates:\n    file_ca: { dir: /nonexistent }\n",
            "t",
        )
        .unwrap()
        .node
    }

    fn wl(uid: &str, ip: [u8; 4], policies: &[&str]) -> Held<AddressEntry> {
        let w = wl::Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            addresses: vec![ip.to_vec()],
            node: "n1".into(),
            authorization_policies: policies.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        };
        Held {
            version: "1".into(),
            value: AddressEntry::Workload(convert::workload(uid, &w).unwrap()),
        }
    }

    fn conn(dst: &str, principal: &str, port: u16) -> Connection {
        let id = crate::identity::SpiffeId::parse(&format!("spiffe://{principal}")).unwrap();
        Connection {
            src_identity: Some(id),
            src_ip: "10.1.1.1".parse().unwrap(),
            dst_ip: "10.0.0.1".parse().unwrap(),
            dst_port: port,
            dst_workload: WorkloadRef {
                name: dst.into(),
                namespace: "ns".into(),
            },
        }
    }

    fn sm(m: sec::string_match::MatchType) -> sec::StringMatch {
        sec::StringMatch {
            match_type: Some(m),
        }
    }

    #[test]
    fn istio_rbac_fields_map_onto_the_engine_and_selectors_follow_the_workloads() {
        use sec::string_match::MatchType::*;
        let mut store = Store::default();
        store
            .addresses
            .insert("a".into(), wl("a", [10, 0, 0, 1], &["ns/deny-b"]));
        store
            .addresses
            .insert("b".into(), wl("b", [10, 0, 0, 2], &[]));
        // WORKLOAD_SELECTOR: applies to the workloads whose authorization_policies name it.
        let deny = sec::Authorization {
            name: "deny-b".into(),
            namespace: "ns".into(),
            scope: sec::Scope::WorkloadSelector as i32,
            action: sec::Action::Deny as i32,
            rules: vec![sec::Rule {
                clauses: vec![sec::Clause {
                    matches: vec![sec::Match {
                        // Istio's principals have no scheme; prefix and suffix forms too.
                        principals: vec![sm(Prefix("cluster.local/ns/bad/".into()))],
                        not_destination_ports: vec![22],
                        ..Default::default()
                    }],
                }],
            }],
            dry_run: false,
        };
        let (item, e) = convert::authorization("ns/deny-b", &deny);
        assert!(e.is_none(), "{e:?}");
        store.policies.insert(
            "ns/deny-b".into(),
            Held {
                version: "1".into(),
                value: item,
            },
        );
        // A namespace ALLOW by service account (fields 11/12) and an ip block, in dry run.
        let dry = sec::Authorization {
            name: "dry".into(),
            namespace: "ns".into(),
            scope: sec::Scope::Namespace as i32,
            action: sec::Action::Allow as i32,
            dry_run: true,
            rules: vec![sec::Rule {
                clauses: vec![sec::Clause {
                    matches: vec![sec::Match {
                        service_accounts: vec![sec::ServiceAccountMatch {
                            namespace: "good".into(),
                            service_account: "sa".into(),
                        }],
                        source_ips: vec![sec::Address {
                            address: vec![10, 1, 0, 0],
                            length: 16,
                        }],
                        ..Default::default()
                    }],
                }],
            }],
        };
        let (item, e) = convert::authorization("ns/dry", &dry);
        assert!(e.is_none(), "{e:?}");
        store.policies.insert(
            "ns/dry".into(),
            Held {
                version: "1".into(),
                value: item,
            },
        );
        let (_, set) = store.build(&node());

        let d = set.evaluate(&conn("a", "cluster.local/ns/bad/sa/x", 80));
        assert!(!d.allowed);
        assert_eq!(d.decided_by.as_deref(), Some("ns/deny-b"));
        // not_destination_ports: port 22 is outside the DENY.
        assert!(
            set.evaluate(&conn("a", "cluster.local/ns/bad/sa/x", 22))
                .allowed
        );
        // The selector does not reach workload b.
        assert!(
            set.evaluate(&conn("b", "cluster.local/ns/bad/sa/x", 80))
                .allowed
        );
        // The dry-run ALLOW is reported, never enforced.
        let d = set.evaluate(&conn("b", "cluster.local/ns/good/sa/sa", 80));
        assert!(d.allowed);
        assert_eq!(d.dry_run_results, vec![("ns/dry".to_string(), true)]);
        let d = set.evaluate(&conn("b", "cluster.local/ns/other/sa/sa", 80));
        assert_eq!(d.dry_run_results, vec![("ns/dry".to_string(), false)]);

        // When the workload stops naming the policy, the selector no longer reaches it.
        store
            .addresses
            .insert("a".into(), wl("a", [10, 0, 0, 1], &[]));
        let (_, set) = store.build(&node());
        assert!(
            set.evaluate(&conn("a", "cluster.local/ns/bad/sa/x", 80))
                .allowed
        );
    }

    /// istiod's mesh-wide STRICT mTLS: one WORKLOAD_SELECTOR DENY in the root namespace that
    /// workloads of every namespace name in their `authorization_policies`.
    #[test]
    fn a_root_namespace_selector_policy_reaches_workloads_in_other_namespaces() {
        use sec::string_match::MatchType::Presence;
        let strict = sec::Authorization {
            name: "istio_converted_static_strict".into(),
            namespace: "istio-system".into(),
            scope: sec::Scope::WorkloadSelector as i32,
            action: sec::Action::Deny as i32,
            rules: vec![sec::Rule {
                clauses: vec![sec::Clause {
                    matches: vec![sec::Match {
                        not_principals: vec![sm(Presence(()))],
                        ..Default::default()
                    }],
                }],
            }],
            dry_run: false,
        };
        let key = "istio-system/istio_converted_static_strict";
        let (item, e) = convert::authorization(key, &strict);
        assert!(e.is_none(), "{e:?}");
        let mut store = Store::default();
        // `a` in namespace ns names the policy; a workload also called `a`, in istio-system,
        // does not.
        store
            .addresses
            .insert("a".into(), wl("a", [10, 0, 0, 1], &[key]));
        let mut same_name = wl::Workload {
            uid: "a-root".into(),
            name: "a".into(),
            namespace: "istio-system".into(),
            addresses: vec![vec![10, 0, 0, 2]],
            node: "n1".into(),
            ..Default::default()
        };
        same_name.service_account = "x".into();
        store.addresses.insert(
            "a-root".into(),
            Held {
                version: "1".into(),
                value: AddressEntry::Workload(convert::workload("a-root", &same_name).unwrap()),
            },
        );
        store.policies.insert(
            key.into(),
            Held {
                version: "1".into(),
                value: item,
            },
        );
        let set = store.policy_set();
        let mut plaintext = conn("a", "cluster.local/ns/x/sa/y", 80);
        plaintext.src_identity = None;
        let d = set.evaluate(&plaintext);
        assert!(!d.allowed, "STRICT must refuse plaintext to ns/a");
        assert_eq!(d.decided_by.as_deref(), Some(key));
        assert!(
            set.evaluate(&conn("a", "cluster.local/ns/x/sa/y", 80))
                .allowed
        );
        plaintext.dst_workload.namespace = "istio-system".into();
        assert!(
            set.evaluate(&plaintext).allowed,
            "istio-system/a does not name the policy"
        );
    }

    #[test]
    fn a_policy_that_cannot_be_read_denies_its_scope() {
        let bad = sec::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            scope: sec::Scope::Namespace as i32,
            action: 7,
            ..Default::default()
        };
        let (item, e) = convert::authorization("ns/p", &bad);
        let e = e.expect("an error");
        assert_eq!((e.resource.as_str(), e.field.as_str()), ("ns/p", "action"));
        let mut store = Store::default();
        store
            .addresses
            .insert("a".into(), wl("a", [10, 0, 0, 1], &[]));
        store.policies.insert(
            "ns/p".into(),
            Held {
                version: "1".into(),
                value: item,
            },
        );
        let (_, set) = store.build(&node());
        assert!(
            !set.evaluate(&conn("a", "cluster.local/ns/x/sa/y", 80))
                .allowed
        );
    }

    #[test]
    fn waypoints_resolve_to_the_workload_at_their_address_or_fail_closed() {
        let mut store = Store::default();
        let mut w = wl::Workload {
            uid: "app".into(),
            name: "app".into(),
            namespace: "ns".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            node: "n1".into(),
            waypoint: Some(wl::GatewayAddress {
                destination: Some(wl::gateway_address::Destination::Address(
                    wl::NetworkAddress {
                        network: String::new(),
                        address: vec![10, 0, 0, 9],
                    },
                )),
                hbone_mtls_port: 15008,
            }),
            ..Default::default()
        };
        let held = |w: &wl::Workload| Held {
            version: "1".into(),
            value: AddressEntry::Workload(convert::workload(&w.uid, w).unwrap()),
        };
        store.addresses.insert("app".into(), held(&w));
        let (m, _) = store.build(&node());
        let unresolved = m.workload_by_uid("app").unwrap().waypoint.clone().unwrap();
        assert!(
            unresolved.starts_with("unresolved-waypoint:"),
            "{unresolved}"
        );
        assert!(m.workload_by_uid(&unresolved).is_none());
        w.uid = "wp".into();
        w.name = "wp".into();
        w.addresses = vec![vec![10, 0, 0, 9]];
        w.waypoint = None;
        store.addresses.insert("wp".into(), held(&w));
        let (m, _) = store.build(&node());
        assert_eq!(
            m.workload_by_uid("app").unwrap().waypoint.as_deref(),
            Some("wp")
        );
    }

    /// istiod's multi-network fields: `network` (4) places a workload, `network_gateway` (19)
    /// names the gateway its network is reached through, resolved to the workload at that
    /// address (whose identity the outer TLS verifies); one that resolves to nothing leaves
    /// that network unreachable.
    #[test]
    fn network_and_network_gateway_from_xds_route_through_the_gateway_workload() {
        let held = |w: &wl::Workload| Held {
            version: "1".into(),
            value: AddressEntry::Workload(convert::workload(&w.uid, w).unwrap()),
        };
        let gw_at = |ip: [u8; 4]| wl::GatewayAddress {
            destination: Some(wl::gateway_address::Destination::Address(
                wl::NetworkAddress {
                    network: "net-b".into(),
                    address: ip.to_vec(),
                },
            )),
            hbone_mtls_port: 15443,
        };
        let mut store = Store::default();
        let client = wl::Workload {
            uid: "client".into(),
            name: "client".into(),
            namespace: "ns".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            node: "n1".into(),
            ..Default::default()
        };
        let mut db = wl::Workload {
            uid: "db".into(),
            name: "db".into(),
            namespace: "ns".into(),
            service_account: "db".into(),
            addresses: vec![vec![10, 9, 0, 1]],
            node: "remote".into(),
            network: "net-b".into(),
            network_gateway: Some(gw_at([192, 0, 2, 9])),
            tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
            services: [(
                "ns/db.ns.svc.cluster.local".to_string(),
                wl::PortList {
                    ports: vec![wl::Port {
                        service_port: 80,
                        target_port: 8080,
                    }],
                },
            )]
            .into(),
            ..Default::default()
        };
        let svc = wl::Service {
            name: "db".into(),
            namespace: "ns".into(),
            hostname: "db.ns.svc.cluster.local".into(),
            addresses: vec![wl::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 9],
            }],
            ports: vec![wl::Port {
                service_port: 80,
                target_port: 8080,
            }],
            ..Default::default()
        };
        store.addresses.insert("client".into(), held(&client));
        store.addresses.insert("db".into(), held(&db));
        store.addresses.insert(
            "ns/db.ns.svc.cluster.local".into(),
            Held {
                version: "1".into(),
                value: AddressEntry::Service(
                    convert::service("ns/db.ns.svc.cluster.local", &svc).unwrap(),
                ),
            },
        );
        let dst: std::net::SocketAddr = "10.96.0.9:80".parse().unwrap();
        let select = |m: &Model| {
            let src = m.workload_by_uid("client").unwrap().clone();
            m.select(
                &src,
                dst,
                &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3),
            )
        };
        // The gateway's address is no workload yet: net-b is unreachable, never plaintext.
        let (m, _) = store.build(&node());
        assert_eq!(m.workload_by_uid("db").unwrap().network, "net-b");
        assert!(matches!(
            select(&m),
            Err(crate::model::SelectError::NoGateway { .. })
        ));
        // The gateway workload arrives: double HBONE to it, verifying its identity.
        let gateway = wl::Workload {
            uid: "ew".into(),
            name: "ew".into(),
            namespace: "istio-system".into(),
            service_account: "eastwest".into(),
            addresses: vec![vec![192, 0, 2, 9]],
            node: "remote-gw".into(),
            network: "net-b".into(),
            ..Default::default()
        };
        store.addresses.insert("ew".into(), held(&gateway));
        let (m, _) = store.build(&node());
        match select(&m).unwrap() {
            crate::model::Route::Gateway {
                gateway,
                gateway_identity,
                authority,
                ..
            } => {
                assert_eq!(gateway, "192.0.2.9:15443".parse().unwrap());
                assert_eq!(
                    gateway_identity.to_string(),
                    "spiffe://cluster.local/ns/istio-system/sa/eastwest"
                );
                assert_eq!(authority, "db.ns.svc.cluster.local:80");
            }
            other => panic!("expected a gateway route, got {other:?}"),
        }
        // A network_gateway that names neither an address nor a hostname refuses the resource.
        db.network_gateway = Some(wl::GatewayAddress {
            destination: None,
            hbone_mtls_port: 0,
        });
        assert!(convert::workload("db", &db).is_err());
    }
}
