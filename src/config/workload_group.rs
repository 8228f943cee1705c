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
//! ```

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
}

impl WorkloadGroupConfig {
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
            "{ name: billing, namespace: finance, service_account: billing-sa, network: vm-net, services: { \"finance/billing.finance.svc.cluster.local\": { 8080: 8080 } } }",
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
        let e =
            serde_yaml::from_str::<WorkloadGroupConfig>("{ name: a, namespace: b, colour: red }");
        assert!(e.unwrap_err().to_string().contains("colour"));
    }
}
