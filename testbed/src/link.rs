//! Wiring between namespaces: point-to-point veth pairs and a per-node
//! bridge that pod namespaces plug into, mirroring how a CNI connects pods
//! to a Kubernetes node. All links are created directly inside their
//! namespaces (never in the host namespace), so concurrent tests cannot
//! collide on interface names and deleting a namespace removes its links.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

use crate::{check_ifname, Netns};

/// Numbers the node-side veth ends of bridge ports.
static PORT_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates a veth pair `a_if` (in `a`, address `a_cidr`) <-> `b_if` (in `b`,
/// address `b_cidr`) and brings both ends up.
///
/// `a_cidr`/`b_cidr` are `ip addr` prefixes like `"10.213.1.1/24"`; the
/// connected route comes with the address, so the two ends can reach each
/// other immediately.
pub fn link_veth(
    a: &Netns,
    a_if: &str,
    a_cidr: &str,
    b: &Netns,
    b_if: &str,
    b_cidr: &str,
) -> Result<()> {
    check_ifname(a_if)?;
    check_ifname(b_if)?;
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])
    .with_context(|| format!("veth {}:{a_if} <-> {}:{b_if}", a.name(), b.name()))?;
    configure(a, a_if, a_cidr)?;
    configure(b, b_if, b_cidr)?;
    Ok(())
}

impl Netns {
    /// Creates bridge `name` in this (node) namespace with address `cidr`
    /// (the pods' gateway, e.g. `"10.213.2.1/24"`) and brings it up.
    pub fn add_bridge(&self, name: &str, cidr: &str) -> Result<()> {
        check_ifname(name)?;
        self.ip(&["link", "add", name, "type", "bridge"])
            .with_context(|| format!("bridge {name} in {}", self.name()))?;
        configure(self, name, cidr)
    }
}

/// Plugs `pod` into `bridge` of `node`: a veth pair with `pod_if` (address
/// `pod_cidr`) in the pod and a generated port enslaved to the bridge in the
/// node, plus a default route in the pod via `gateway` (normally the
/// bridge's address, without prefix length).
///
/// Returns the node-side interface name so tests can capture on the port.
pub fn attach_to_bridge(
    node: &Netns,
    bridge: &str,
    pod: &Netns,
    pod_if: &str,
    pod_cidr: &str,
    gateway: &str,
) -> Result<String> {
    check_ifname(pod_if)?;
    let port = format!("zbp{}", PORT_COUNTER.fetch_add(1, Ordering::Relaxed));
    check_ifname(&port)?;
    pod.ip(&[
        "link",
        "add",
        pod_if,
        "type",
        "veth",
        "peer",
        "name",
        &port,
        "netns",
        node.name(),
    ])
    .with_context(|| format!("veth {}:{pod_if} <-> {}:{port}", pod.name(), node.name()))?;
    node.ip(&["link", "set", &port, "master", bridge, "up"])?;
    configure(pod, pod_if, pod_cidr)?;
    pod.ip(&["route", "add", "default", "via", gateway, "dev", pod_if])?;
    Ok(port)
}

/// Assigns `cidr` to `ifname` and brings it up.
fn configure(ns: &Netns, ifname: &str, cidr: &str) -> Result<()> {
    ns.ip(&["addr", "add", cidr, "dev", ifname])?;
    ns.ip(&["link", "set", ifname, "up"])?;
    Ok(())
}
