//! `workload_groups:` in a control plane's mesh file (issue #16 part 5): Istio's WorkloadGroup,
//! the template a VM is auto-registered from when its node connects with
//! `AUTO_REGISTER_GROUP` in its metadata (`ISTIO_META_AUTO_REGISTER_GROUP`).
//!
//! ```yaml
//! workload_groups:
//!   - name: billing
//!     namespace: finance
//!     service_account: billing-sa
//!     network: vm-net                       # optional: the registering VM's network
//!     services: { "finance/billing.finance.svc.cluster.local": { 8080: 8080 } }
//!     nodes: [vm-billing-1, "vm-billing-*"] # whose node tokens may register (and be issued
//!                                           # the group's identity); `*` only at the end
//! ```
//!
//! `nodes` is what Istio gets from the VM's service-account token: proof that the caller may
//! run as the group's identity. A node token proves only a node name, so the group names the
//! nodes it admits; a node not listed registers nothing and is issued no certificate for the
//! group's identity (fail closed).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use super::{BoundedString, WorkloadConfig};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkloadGroupConfig {
    pub name: BoundedString,
    pub namespace: BoundedString,
    #[serde(default = "super::default_sa")]
    pub service_account: BoundedString,
    #[serde(default)]
    pub network: Option<BoundedString>,
    #[serde(default)]
    pub services: BTreeMap<BoundedString, BTreeMap<u16, u16>>,
    /// Node names (bootstrap-token names) admitted: exact, or a prefix ending in `*`. Empty
    /// (the default) is refused at load, naming the field.
    #[serde(default)]
    pub nodes: Vec<BoundedString>,
}

/// Whether `pattern` (a node name, or a prefix followed by `*`) admits `node`.
fn admits(pattern: &str, node: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => node.len() > prefix.len() && node.starts_with(prefix),
        None => pattern == node,
    }
}

impl WorkloadGroupConfig {
    /// Whether node `node` may register into this group (and hold its identity).
    pub fn admits(&self, node: &str) -> bool {
        self.nodes.iter().any(|p| admits(p, node))
    }

    /// The problem with a `nodes` entry, if any: empty, `*` anywhere but at the end, or a bare
    /// `*` (every node of the mesh could then take this identity).
    pub fn node_pattern_error(pattern: &str) -> Option<&'static str> {
        let body = pattern.strip_suffix('*').unwrap_or(pattern);
        if body.is_empty() {
            Some("a node pattern needs at least one character before any `*`")
        } else if body.contains('*') {
            Some("`*` may only end a node pattern")
        } else if !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            Some("node names are [A-Za-z0-9._-]")
        } else {
            None
        }
    }

    /// The workload a VM of this group on node `node` at `ip` is registered as (Istio's
    /// auto-registered WorkloadEntry). One per group and node: a reconnect replaces it.
    pub fn register(&self, node: &str, ip: IpAddr) -> WorkloadConfig {
        let mut w: WorkloadConfig = serde_yaml::from_str(&format!(
            "{{ uid: x, name: x, namespace: x, addresses: [{ip}], node: x }}"
        ))
        .expect("a fixed, valid workload");
        w.uid = BoundedString(format!("{}/{}/{node}", self.namespace, self.name));
        w.name = BoundedString(format!(
            "{}-{}",
            self.name,
            ip.to_string().replace([':', '.'], "-")
        ));
        w.namespace = self.namespace.clone();
        w.service_account = self.service_account.clone();
        w.node = BoundedString(node.to_string());
        w.network = self.network.clone();
        w.services = self.services.clone();
        w.canonical_name = Some(self.name.clone());
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_vm_carries_the_groups_identity_services_and_network_on_its_node() {
        let g: WorkloadGroupConfig = serde_yaml::from_str(
            "{ name: billing, namespace: finance, service_account: billing-sa, network: vm-net, services: { \"finance/billing.finance.svc.cluster.local\": { 8080: 8080 } }, nodes: [vm-7, \"vm-b-*\"] }",
        )
        .unwrap();
        let w = g.register("vm-7", "192.0.2.7".parse().unwrap());
        assert_eq!(w.uid.0, "finance/billing/vm-7");
        assert_eq!(w.name.0, "billing-192-0-2-7");
        assert_eq!(
            (w.namespace.0.as_str(), w.service_account.0.as_str()),
            ("finance", "billing-sa")
        );
        assert_eq!(w.node.0, "vm-7");
        assert_eq!(w.addresses, vec!["192.0.2.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(w.network.unwrap().0, "vm-net");
        assert_eq!(w.services.len(), 1);
        // Exact names and prefixes are admitted; nothing else, and a bare prefix is no node.
        assert!(g.admits("vm-7") && g.admits("vm-b-1"));
        assert!(!g.admits("vm-70") && !g.admits("vm-b-") && !g.admits("laptop"));
        for (bad, why) in [
            ("*", "before any"),
            ("", "before any"),
            ("vm-*-x", "only end"),
            ("vm 1", "[A-Za-z0-9._-]"),
        ] {
            let e = WorkloadGroupConfig::node_pattern_error(bad).unwrap();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert_eq!(WorkloadGroupConfig::node_pattern_error("vm-*"), None);
        let e = serde_yaml::from_str::<WorkloadGroupConfig>(
            "{ name: a, namespace: b, nodes: [x], colour: red }",
        );
        assert!(e.unwrap_err().to_string().contains("colour"));
    }
}
