//! Three node namespaces on one bridge, for the waypoint: node 1 runs `zmesh-node` (the client
//! pod's tunnel, outbound capture), node 2 runs `zmesh-waypoint`, node 3 runs `zmesh-node`
//! with two workload addresses and inbound capture on the app port. The tier (c) waypoint test
//! and the waypoint benchmark build the same topology.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::mesh::install_rules;
use crate::{attach_to_bridge, Child, Netns};

pub const GATEWAY: &str = "10.218.0.1";
pub const N1_IP: &str = "10.218.0.11";
pub const WAYPOINT_IP: &str = "10.218.0.12";
pub const N3_IP: &str = "10.218.0.13";
/// A second address on node 3 (the second version of the service).
pub const N3_IP2: &str = "10.218.0.14";
/// The port the apps on node 3 listen on; inbound plaintext to it is captured.
pub const APP_PORT: u16 = 8080;
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct ThreeNodes {
    // Drop order: processes, then namespaces, then files.
    pub node1: Child,
    pub waypoint: Child,
    pub node3: Child,
    pub n1: Netns,
    pub n2: Netns,
    pub n3: Netns,
    _switch: Netns,
    pub dir: tempfile::TempDir,
}

impl ThreeNodes {
    /// Builds the topology, creates a CA, writes the three configs (the text `CA_DIR` in them
    /// is replaced by the CA's directory) and starts the processes.
    pub fn start(node_bin: &Path, waypoint_bin: &Path, configs: [String; 3]) -> Result<ThreeNodes> {
        let switch = Netns::new("zwS")?;
        switch.add_bridge("zbr", &format!("{GATEWAY}/24"))?;
        let (n1, n2, n3) = (Netns::new("zw1")?, Netns::new("zw2")?, Netns::new("zw3")?);
        for (ns, ip) in [(&n1, N1_IP), (&n2, WAYPOINT_IP), (&n3, N3_IP)] {
            attach_to_bridge(&switch, "zbr", ns, "eth0", &format!("{ip}/24"), GATEWAY)?;
        }
        n3.ip(&["addr", "add", &format!("{N3_IP2}/24"), "dev", "eth0"])?;
        let dir = tempfile::tempdir().context("temp dir")?;
        let ca = dir.path().join("ca");
        let out = std::process::Command::new(node_bin)
            .args(["ca", "init", "--dir"])
            .arg(&ca)
            .output()
            .with_context(|| format!("running {}", node_bin.display()))?;
        ensure!(
            out.status.success(),
            "ca init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut paths = Vec::new();
        for (i, text) in configs.iter().enumerate() {
            let p = dir.path().join(format!("n{}.yaml", i + 1));
            std::fs::write(&p, text.replace("CA_DIR", &ca.display().to_string()))?;
            paths.push(p);
        }
        install_rules(&n1, vec![])?;
        install_rules(&n3, vec![APP_PORT])?;
        let spawn = |ns: &Netns, bin: &Path, cfg: &Path, ready: &str| -> Result<Child> {
            let bin = bin.to_str().context("binary path is not UTF-8")?;
            let cfg = cfg.to_str().context("config path is not UTF-8")?;
            let child = ns.spawn(bin, &["run", "--config", cfg], &[("ZMESH_LOG", "info")])?;
            child.wait_for_log(ready, START_TIMEOUT)?;
            Ok(child)
        };
        let node1 = spawn(&n1, node_bin, &paths[0], "zmesh node ready")?;
        let waypoint = spawn(&n2, waypoint_bin, &paths[1], "zmesh waypoint ready")?;
        let node3 = spawn(&n3, node_bin, &paths[2], "zmesh node ready")?;
        Ok(ThreeNodes {
            node1,
            waypoint,
            node3,
            n1,
            n2,
            n3,
            _switch: switch,
            dir,
        })
    }
}
