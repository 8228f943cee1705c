//! Networks (docs/model.md "Networks"): which network the node and each workload are on, the
//! east-west gateways through which another network's services are reached, and the node's own
//! east-west gateway mode.
//!
//! ```yaml
//! node:
//!   network: network-a            # default "" (one flat network, as Istio's default)
//!   east_west_gateway:            # optional: this node relays other networks' callers
//!     workload: gw-b              # the gateway's own workload (uid, on this node)
//!     expose: ["*"]               # service hostnames it relays to ("*" = all, the default)
//! networks:
//!   - name: network-b
//!     gateways:
//!       - address: 10.77.9.2      # where network-b's gateway is reached from here
//!         port: 15008             # its HBONE port (default 15008)
//!         identity: spiffe://cluster.local/ns/istio-system/sa/eastwest
//! ```

use std::net::IpAddr;

use serde::Deserialize;

use super::BoundedString;
use crate::identity::SpiffeId;

/// At most this many networks and gateways per network: a typo cannot make the model huge.
pub const MAX_NETWORKS: usize = 256;
pub const MAX_GATEWAYS: usize = 16;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub name: BoundedString,
    pub gateways: Vec<GatewayConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub address: IpAddr,
    #[serde(default = "default_gateway_port")]
    pub port: u16,
    /// The SPIFFE identity the gateway's certificate must carry (the outer TLS is verified
    /// against it, never against "any mesh identity").
    pub identity: BoundedString,
}

fn default_gateway_port() -> u16 {
    15008
}

/// A workload's `network_gateway` as istiod sends it (Workload field 19): the gateway through
/// which that workload's network is reached, resolved against the model when it is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkGatewayRef {
    pub target: GatewayTarget,
    /// `hbone_mtls_port` (15008 when istiod leaves it 0).
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayTarget {
    /// A workload's address: that workload is the gateway.
    Ip(IpAddr),
    /// `namespace/hostname` of a service whose endpoints are the gateways.
    Service(String),
}

/// `node.east_west_gateway`: this node terminates outer HBONE from other networks and relays
/// the inner stream, untouched, to an endpoint of the named service on its own network.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EastWestGateway {
    /// uid of the gateway's own workload (on this node): only its listener relays, and its
    /// policies decide who may cross. Every other local workload serves as usual.
    pub workload: BoundedString,
    /// Service hostnames (`hostname` or `namespace/hostname`) it relays to; `"*"` = all.
    #[serde(default = "default_expose")]
    pub expose: Vec<BoundedString>,
    /// istiod's (or a zmesh control plane's) `ip:port`: the gateway passes TCP on its port
    /// 15012 through to it untouched, so VMs and nodes of other networks reach the control
    /// plane through this gateway (Istio's "expose istiod"). The TLS inside ends at the
    /// control plane; the gateway sees only ciphertext.
    #[serde(default)]
    pub control_plane: Option<std::net::SocketAddr>,
}

/// The gateway's control-plane passthrough port (Istio's, for istiod's xDS and CA).
pub const CONTROL_PLANE_PORT: u16 = 15012;

fn default_expose() -> Vec<BoundedString> {
    vec![BoundedString("*".into())]
}

impl EastWestGateway {
    /// Whether the service `namespace/hostname` is relayed.
    pub fn exposes(&self, namespace: &str, hostname: &str) -> bool {
        self.expose.iter().any(|e| {
            e.0 == "*"
                || e.0 == hostname
                || e.0
                    .split_once('/')
                    .is_some_and(|(ns, h)| ns == namespace && h == hostname)
        })
    }
}

/// Validates `networks:`: unique non-empty names, at least one gateway each, gateway ports and
/// identities that parse. Returns (field, value, reason) of the first problem.
pub fn validate(networks: &[NetworkConfig]) -> Result<(), (String, String, String)> {
    if networks.len() > MAX_NETWORKS {
        return Err((
            "networks".into(),
            networks.len().to_string(),
            format!("at most {MAX_NETWORKS} networks"),
        ));
    }
    let mut names = std::collections::HashSet::new();
    for (i, n) in networks.iter().enumerate() {
        let at = |f: &str| format!("networks[{i}].{f}");
        if n.name.is_empty() {
            return Err((at("name"), String::new(), "a network needs a name".into()));
        }
        if !names.insert(n.name.0.as_str()) {
            return Err((at("name"), n.name.0.clone(), "duplicate network".into()));
        }
        if n.gateways.is_empty() || n.gateways.len() > MAX_GATEWAYS {
            return Err((
                at("gateways"),
                n.gateways.len().to_string(),
                format!("a network needs 1 to {MAX_GATEWAYS} gateways"),
            ));
        }
        for (j, g) in n.gateways.iter().enumerate() {
            if g.port == 0 {
                return Err((
                    at(&format!("gateways[{j}].port")),
                    "0".into(),
                    "port 0 is not a port".into(),
                ));
            }
            SpiffeId::parse(&g.identity).map_err(|e| {
                (
                    at(&format!("gateways[{j}].identity")),
                    g.identity.0.clone(),
                    e.to_string(),
                )
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(name: &str, identity: &str, port: u16) -> NetworkConfig {
        NetworkConfig {
            name: BoundedString(name.into()),
            gateways: vec![GatewayConfig {
                address: [10, 0, 0, 1].into(),
                port,
                identity: BoundedString(identity.into()),
            }],
        }
    }

    const ID: &str = "spiffe://cluster.local/ns/istio-system/sa/eastwest";

    #[test]
    fn good_networks_pass_and_each_mistake_is_named() {
        assert_eq!(
            validate(&[net("b", ID, 15008), net("c", ID, 15443)]),
            Ok(())
        );
        let e = validate(&[net("b", ID, 15008), net("b", ID, 15008)]).unwrap_err();
        assert_eq!(
            (e.0.as_str(), e.2.as_str()),
            ("networks[1].name", "duplicate network")
        );
        let e = validate(&[net("", ID, 15008)]).unwrap_err();
        assert_eq!(e.0, "networks[0].name");
        let e = validate(&[net("b", ID, 0)]).unwrap_err();
        assert_eq!(e.0, "networks[0].gateways[0].port");
        let e = validate(&[net("b", "eastwest", 15008)]).unwrap_err();
        assert_eq!(e.0, "networks[0].gateways[0].identity");
        let mut none = net("b", ID, 15008);
        none.gateways.clear();
        assert_eq!(validate(&[none]).unwrap_err().0, "networks[0].gateways");
    }

    #[test]
    fn exposure_is_all_by_default_and_exact_otherwise() {
        let all = EastWestGateway {
            control_plane: None,
            workload: BoundedString("gw".into()),
            expose: default_expose(),
        };
        assert!(all.exposes("data", "db.data.svc.cluster.local"));
        let some = EastWestGateway {
            control_plane: None,
            workload: BoundedString("gw".into()),
            expose: vec![
                BoundedString("db.data.svc.cluster.local".into()),
                BoundedString("web/front.web.svc.cluster.local".into()),
            ],
        };
        assert!(some.exposes("data", "db.data.svc.cluster.local"));
        assert!(some.exposes("web", "front.web.svc.cluster.local"));
        assert!(!some.exposes("other", "front.web.svc.cluster.local"));
        assert!(!some.exposes("data", "db2.data.svc.cluster.local"));
    }
}
