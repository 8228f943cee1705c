//! Two networks that cannot route to each other, joined only through their east-west gateways
//! (docs/model.md "Networks"):
//!
//! ```text
//!  network-a (10.207.1.0/24)                                  network-b (10.207.2.0/24)
//!  A1 .11 ─┐                                                  ┌─ B1 .11
//!  A2 .12 ─┴─ bridge in GA (.1) ── GA 10.207.9.1 ═ 10.207.9.2 GB ── bridge in GB (.1)
//! ```
//!
//! A1, A2 and B1 run `zmesh-node` with the host capture rules (A2 and B1 also capture inbound
//! to the app port); GA and GB run `zmesh-node` as east-west gateways. GA and GB forward only
//! towards the link (they know no route into the other network) and masquerade what they
//! forward, so A1 reaches GB's link address and nothing behind it: the only way from one
//! network into the other is a gateway's HBONE port.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::mesh::install_rules;
use crate::{attach_to_bridge, link_veth, Child, Netns};

pub const A1_IP: &str = "10.207.1.11";
pub const A2_IP: &str = "10.207.1.12";
pub const GA_LAN: &str = "10.207.1.1";
pub const GA_LINK: &str = "10.207.9.1";
pub const GB_LINK: &str = "10.207.9.2";
pub const GB_LAN: &str = "10.207.2.1";
pub const B1_IP: &str = "10.207.2.11";
/// A laptop on network-a (tests plug it into `GA_BRIDGE` themselves): the `laptop` workload.
pub const LAPTOP_IP: &str = "10.207.1.21";
/// Network-a's bridge, in GA's namespace.
pub const GA_BRIDGE: &str = "zn-bra";
/// GA's interface on the inter-network link (captures of what crosses it).
pub const GA_LINK_IF: &str = "zn-link-a";
/// GB's side of network-b's bridge (captures of what the gateway relays).
pub const GB_BRIDGE: &str = "zn-brb";
/// The apps' port on A2 and B1; inbound plaintext to it is captured.
pub const APP_PORT: u16 = 8080;
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The nodes, by config name.
pub const NODES: [&str; 5] = ["a1", "a2", "ga", "gb", "b1"];

pub struct TwoNetworks {
    // Drop order: processes, then namespaces, then files.
    pub a1_node: Child,
    pub a2_node: Child,
    pub ga_node: Child,
    pub gb_node: Child,
    pub b1_node: Child,
    pub a1: Netns,
    pub a2: Netns,
    pub ga: Netns,
    pub gb: Netns,
    pub b1: Netns,
    pub dir: tempfile::TempDir,
}

/// The `node:` section of each node.
fn node_section(name: &str, ca: &Path) -> String {
    let (network, gateway) = match name {
        "a1" | "a2" => ("network-a", ""),
        "ga" => ("network-a", "  east_west_gateway: { workload: ga }\n"),
        "gb" => ("network-b", "  east_west_gateway: { workload: gb }\n"),
        _ => ("network-b", ""),
    };
    format!(
        "node:\n  name: {name}\n  network: {network}\n  access_log: json\n{gateway}  certificates:\n    file_ca: {{ dir: {} }}\n",
        ca.display()
    )
}

/// What every node's file shares: both networks' gateways, the workloads (each on its
/// network) and services `db` (endpoints on A2 and B1), `only-b` (B1) and `web` (A2).
/// `extra` is appended (say, `policies:`).
pub fn shared_config(extra: &str) -> String {
    format!(
        r#"networks:
  - name: network-a
    gateways: [{{ address: {GA_LINK}, identity: "spiffe://cluster.local/ns/istio-system/sa/eastwest-a" }}]
  - name: network-b
    gateways: [{{ address: {GB_LINK}, identity: "spiffe://cluster.local/ns/istio-system/sa/eastwest-b" }}]
workloads:
  - {{ uid: a1-app, name: frontend, namespace: shop, service_account: frontend, addresses: [{A1_IP}], node: a1, network: network-a }}
  - {{ uid: a2-app, name: db-a, namespace: data, service_account: db, addresses: [{A2_IP}], node: a2, network: network-a, status: healthy, services: {{ "data/db.data.svc.cluster.local": {{ 80: {APP_PORT} }}, "shop/web.shop.svc.cluster.local": {{ 80: {APP_PORT} }} }} }}
  - {{ uid: ga, name: eastwest-a, namespace: istio-system, service_account: eastwest-a, addresses: [{GA_LINK}, {GA_LAN}], node: ga, network: network-a }}
  - {{ uid: gb, name: eastwest-b, namespace: istio-system, service_account: eastwest-b, addresses: [{GB_LINK}, {GB_LAN}], node: gb, network: network-b }}
  - {{ uid: laptop, name: laptop, namespace: shop, service_account: laptop, addresses: [{LAPTOP_IP}], node: laptop, network: network-a }}
  - {{ uid: b1-app, name: db-b, namespace: data, service_account: db-b, addresses: [{B1_IP}], node: b1, network: network-b, services: {{ "data/db.data.svc.cluster.local": {{ 80: {APP_PORT} }}, "data/only-b.data.svc.cluster.local": {{ 5432: {APP_PORT} }} }} }}
services:
  - {{ name: db, namespace: data, hostname: db.data.svc.cluster.local, vips: [10.96.207.1], ports: {{ 80: {APP_PORT} }} }}
  - {{ name: only-b, namespace: data, hostname: only-b.data.svc.cluster.local, vips: [10.96.207.2], ports: {{ 5432: {APP_PORT} }} }}
  - {{ name: web, namespace: shop, hostname: web.shop.svc.cluster.local, vips: [10.96.207.3], ports: {{ 80: {APP_PORT} }} }}
{extra}"#
    )
}

impl TwoNetworks {
    /// Builds the topology and starts the five nodes with `shared_config(extra)`, A2's endpoint
    /// healthy.
    pub fn start(zmesh_node: &Path, extra: &str) -> Result<TwoNetworks> {
        let ga = Netns::new("znGA")?;
        let gb = Netns::new("znGB")?;
        let a1 = Netns::new("znA1")?;
        let a2 = Netns::new("znA2")?;
        let b1 = Netns::new("znB1")?;
        ga.add_bridge(GA_BRIDGE, &format!("{GA_LAN}/24"))?;
        gb.add_bridge(GB_BRIDGE, &format!("{GB_LAN}/24"))?;
        attach_to_bridge(&ga, GA_BRIDGE, &a1, "eth0", &format!("{A1_IP}/24"), GA_LAN)?;
        attach_to_bridge(&ga, GA_BRIDGE, &a2, "eth0", &format!("{A2_IP}/24"), GA_LAN)?;
        attach_to_bridge(&gb, GB_BRIDGE, &b1, "eth0", &format!("{B1_IP}/24"), GB_LAN)?;
        link_veth(
            &ga,
            GA_LINK_IF,
            &format!("{GA_LINK}/30"),
            &gb,
            "zn-link-b",
            &format!("{GB_LINK}/30"),
        )?;
        // Each edge forwards its network's traffic to the link only, masqueraded, and knows no
        // route into the other network.
        for (ns, link) in [(&ga, GA_LINK_IF), (&gb, "zn-link-b")] {
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.exec(&[
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                link,
                "-j",
                "MASQUERADE",
            ])?;
        }
        let dir = tempfile::tempdir().context("temp dir")?;
        let ca = dir.path().join("ca");
        let out = std::process::Command::new(zmesh_node)
            .args(["ca", "init", "--dir"])
            .arg(&ca)
            .output()
            .with_context(|| format!("running {}", zmesh_node.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "ca init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let shared = shared_config(extra);
        for name in NODES {
            let text = format!("{}{shared}", node_section(name, &ca));
            std::fs::write(dir.path().join(format!("{name}.yaml")), text)?;
        }
        install_rules(&a1, vec![])?;
        install_rules(&a2, vec![APP_PORT])?;
        install_rules(&b1, vec![APP_PORT])?;
        let bin = zmesh_node.to_str().context("binary path is not UTF-8")?;
        let spawn = |ns: &Netns, name: &str| -> Result<Child> {
            let cfg = dir.path().join(format!("{name}.yaml"));
            let cfg = cfg.to_str().context("config path is not UTF-8")?;
            let child = ns.spawn(bin, &["run", "--config", cfg], &[("ZMESH_LOG", "info")])?;
            child.wait_for_log("zmesh node ready", START_TIMEOUT)?;
            Ok(child)
        };
        Ok(TwoNetworks {
            a1_node: spawn(&a1, "a1")?,
            a2_node: spawn(&a2, "a2")?,
            ga_node: spawn(&ga, "ga")?,
            gb_node: spawn(&gb, "gb")?,
            b1_node: spawn(&b1, "b1")?,
            a1,
            a2,
            ga,
            gb,
            b1,
            dir,
        })
    }

    pub fn config_path(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.yaml"))
    }

    /// Rewrites node `node`'s file with A2's endpoint `healthy` or not and reloads it (SIGHUP),
    /// waiting until the node has applied it.
    pub fn set_a2_health(&self, node: &str, healthy: bool) -> Result<()> {
        let p = self.config_path(node);
        let text = std::fs::read_to_string(&p)?;
        let (from, to) = if healthy {
            ("status: unhealthy", "status: healthy")
        } else {
            ("status: healthy", "status: unhealthy")
        };
        let child = match node {
            "a1" => &self.a1_node,
            "a2" => &self.a2_node,
            "ga" => &self.ga_node,
            "gb" => &self.gb_node,
            _ => &self.b1_node,
        };
        // Counted before the edit: the node's file watcher may pick the edit up by itself.
        let before = child.read_log().matches("config reloaded").count();
        std::fs::write(&p, text.replace(from, to))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )?;
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        while child.read_log().matches("config reloaded").count() == before {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{node} did not reload: {}",
                child.read_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}
