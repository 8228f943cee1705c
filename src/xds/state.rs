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

    /// The model and policies these resources describe, for the node `node`. Waypoints are
    /// resolved to the uid of the workload at their address (or the first endpoint of their
    /// service); one that resolves to nothing stays as a uid no workload has, so traffic to
    /// what it fronts fails instead of skipping the waypoint (fail closed).
    pub fn build(&self, node: &NodeConfig) -> (Model, PolicySet) {
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
        let mut selected: HashMap<&str, Vec<String>> = HashMap::new();
        for e in self.addresses.values() {
            match &e.value {
                AddressEntry::Workload(w) => {
                    let mut c = w.config.clone();
                    c.waypoint = resolve(&w.waypoint);
                    for p in &w.policies {
                        selected
                            .entry(p.as_str())
                            .or_default()
                            .push(w.config.name.0.clone());
                    }
                    workloads.push(c);
                }
                AddressEntry::Service(s) => {
                    let mut c = s.config.clone();
                    c.waypoint = resolve(&s.waypoint);
                    services.push(c);
                }
            }
        }
        let model = Model::build(node, &workloads, &services);
        let entries = self
            .policies
            .iter()
            .map(|(name, held)| match &held.value {
                PolicyItem::Valid(p) => {
                    let mut p = p.clone();
                    if let Scope::WorkloadSelector { workloads } = &mut p.scope {
                        *workloads = selected.get(name.as_str()).cloned().unwrap_or_default();
                    }
                    PolicyEntry::Valid(p)
                }
                PolicyItem::Broken(b) => {
                    let mut b = b.clone();
                    if let Some(Scope::WorkloadSelector { workloads }) = &mut b.scope {
                        *workloads = selected.get(name.as_str()).cloned().unwrap_or_default();
                    }
                    PolicyEntry::Broken(b)
                }
            })
            .collect();
        (model, PolicySet::new(entries))
    }
}
