//! A two-node host-mode mesh: nodes A and B are network namespaces joined by a veth pair, each
//! running a real `zmesh-node` process with the real capture rules of `zmesh-redirect host
//! install`. The tier (c) tests and the demo both build it, so what the demo shows is exactly
//! what CI checks.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use zmesh_redirect::{Backend, HostOptions};

use crate::{link_veth, Child, Netns};

pub const A_IP: &str = "10.213.0.1";
pub const B_IP: &str = "10.213.0.2";
pub const A_IF: &str = "zm-a";
pub const B_IF: &str = "zm-b";
/// The application port on node B. Inbound plaintext to it is captured to :15006.
pub const APP_PORT: u16 = 8080;
/// How long a node may take to start (certificate issuance + binding).
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running two-node host-mode mesh; dropping it stops the nodes and deletes the namespaces.
pub struct HostMesh {
    // Field order is drop order: processes first, then namespaces, then files.
    pub node_a: Child,
    pub node_b: Child,
    pub a: Netns,
    pub b: Netns,
    pub dir: tempfile::TempDir,
}

fn config(name: &str, ca: &Path, access_log: &str, workers: usize) -> String {
    node_config(
        name,
        ca,
        &format!("  access_log: {access_log}\n  worker_threads: {workers}\n"),
    )
}

/// The two-node mesh's config for node `name` (its two workloads, certificates from the file CA
/// at `ca`), with `node_lines` (indented YAML lines ending in newlines) added under `node:`.
pub fn node_config(name: &str, ca: &Path, node_lines: &str) -> String {
    format!(
        "# Written by zmesh-testbed.
node:
  name: {name}
  trust_domain: cluster.local
{node_lines}  certificates:
    file_ca: {{ dir: {ca}, ttl: 1h }}
workloads:
  - uid: vm-a
    name: app-a
    namespace: shop
    service_account: frontend
    addresses: [{A_IP}]
    node: node-a
  - uid: vm-b
    name: app-b
    namespace: shop
    service_account: backend
    addresses: [{B_IP}]
    node: node-b
",
        ca = ca.display()
    )
}

impl HostMesh {
    /// Builds the topology and starts `zmesh_node` (a path to the binary) on both nodes.
    pub fn start(zmesh_node: &Path, access_log: &str) -> Result<HostMesh> {
        // ZMESH_WORKERS lets benchmarks compare runtime sizes; 0 = the node's default.
        let workers = std::env::var("ZMESH_WORKERS")
            .ok()
            .and_then(|w| w.parse().ok())
            .unwrap_or(0);
        Self::start_with(zmesh_node, access_log, workers)
    }

    /// `start` with an explicit data-plane worker count for both nodes.
    pub fn start_with(zmesh_node: &Path, access_log: &str, workers: usize) -> Result<HostMesh> {
        Self::start_configured(zmesh_node, |name, ca| config(name, ca, access_log, workers))
    }

    /// The topology and rules of `start`, each node running the config `make(node name, CA
    /// dir)` returns (the CA dir holds a dev CA made with `ca init`).
    pub fn start_configured(
        zmesh_node: &Path,
        make: impl Fn(&str, &Path) -> String,
    ) -> Result<HostMesh> {
        let a = Netns::new("zmA")?;
        let b = Netns::new("zmB")?;
        link_veth(
            &a,
            A_IF,
            &format!("{A_IP}/24"),
            &b,
            B_IF,
            &format!("{B_IP}/24"),
        )?;
        let dir = tempfile::tempdir().context("temp dir")?;
        let ca = dir.path().join("ca");
        let out = std::process::Command::new(zmesh_node)
            .args(["ca", "init", "--dir"])
            .arg(&ca)
            .args(["--trust-domain", "cluster.local"])
            .output()
            .with_context(|| format!("running {}", zmesh_node.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "ca init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let mut paths: Vec<PathBuf> = Vec::new();
        for name in ["node-a", "node-b"] {
            let p = dir.path().join(format!("{name}.yaml"));
            std::fs::write(&p, make(name, &ca))?;
            paths.push(p);
        }
        // Node A captures its outbound traffic; node B also captures plaintext inbound to the
        // app port, so nothing reaches the app around the tunnel.
        install_rules(&a, vec![])?;
        install_rules(&b, vec![APP_PORT])?;
        let bin = zmesh_node.to_str().context("binary path is not UTF-8")?;
        let node_a = spawn_node(&a, bin, &paths[0])?;
        let node_b = spawn_node(&b, bin, &paths[1])?;
        Ok(HostMesh {
            node_a,
            node_b,
            a,
            b,
            dir,
        })
    }

    /// Stops both nodes and starts `zmesh_node` (another build, say) in their place with the
    /// same configs; the namespaces and capture rules stay.
    pub fn restart_nodes(&mut self, zmesh_node: &Path) -> Result<()> {
        let bin = zmesh_node.to_str().context("binary path is not UTF-8")?;
        self.node_a.kill()?;
        self.node_b.kill()?;
        self.node_a = spawn_node(&self.a, bin, &self.config_path("node-a"))?;
        self.node_b = spawn_node(&self.b, bin, &self.config_path("node-b"))?;
        Ok(())
    }

    /// The dev CA `ca init` made for this mesh.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    pub fn config_path(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.yaml"))
    }

    /// Access-log lines a node has written so far.
    pub fn access_log(node: &Child) -> Vec<String> {
        node.read_log()
            .lines()
            .filter(|l| l.contains("connection complete"))
            .map(str::to_string)
            .collect()
    }
}

fn spawn_node(ns: &Netns, bin: &str, cfg: &Path) -> Result<Child> {
    let cfg = cfg.to_str().context("config path is not UTF-8")?;
    let child = ns.spawn(bin, &["run", "--config", cfg], &[("ZMESH_LOG", "info")])?;
    child.wait_for_log("zmesh node ready", START_TIMEOUT)?;
    Ok(child)
}

/// Installs the host capture rules inside `ns` (the rule commands inherit the namespace of the
/// thread that runs them).
pub fn install_rules(ns: &Netns, inbound_ports: Vec<u16>) -> Result<()> {
    let opts = HostOptions {
        inbound_ports,
        ..HostOptions::default()
    };
    ns.run(|| zmesh_redirect::install(&opts, Backend::Iptables))
        .with_context(|| format!("installing capture rules in {}", ns.name()))
}

/// Connects from `ns` to `addr` with a socket carrying the tunnel's mark (1337), which the capture
/// rules let through untouched: a stand-in for a client outside the mesh, or for the
/// direct-TCP baseline over the same link.
pub fn connect_uncaptured(ns: &Netns, addr: SocketAddr) -> Result<TcpStream> {
    ns.run(|| -> std::io::Result<TcpStream> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_mark(zmesh_redirect::TUNNEL_MARK)?;
        s.set_nodelay(true)?;
        s.connect(&addr.into())?;
        Ok(s.into())
    })
    .with_context(|| format!("uncaptured connect from {} to {addr}", ns.name()))
}

/// `zmesh-redirect`, which the workspace build puts beside `zmesh-node` (the path tests get from
/// `CARGO_BIN_EXE_zmesh-node`).
pub fn redirect_bin(zmesh_node: &Path) -> PathBuf {
    let p = zmesh_node.with_file_name("zmesh-redirect");
    assert!(
        p.exists(),
        "{} missing: build the workspace first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Starts the redirect agent in `ns` with its ZDS and admin sockets, and waits (up to 5 s) until
/// its admin socket exists, i.e. until it takes enrollment requests.
pub fn start_agent(ns: &Netns, zmesh_node: &Path, zds: &Path, admin: &Path) -> Result<Child> {
    start_agent_with(ns, zmesh_node, zds, admin, &[], &[], Duration::from_secs(5))
}

/// [`start_agent`] with extra arguments (e.g. `--kube-api URL --node-name N`) and environment,
/// waiting up to `ready` for the admin socket: an agent binds it only once it has rebuilt its
/// pods (state file, Kubernetes API), which may take longer than a bare start.
pub fn start_agent_with(
    ns: &Netns,
    zmesh_node: &Path,
    zds: &Path,
    admin: &Path,
    extra_args: &[&str],
    envs: &[(&str, &str)],
    ready: Duration,
) -> Result<Child> {
    let bin = redirect_bin(zmesh_node);
    let mut args = vec![
        "agent",
        "--zds-socket",
        zds.to_str().context("socket path is not UTF-8")?,
        "--admin-socket",
        admin.to_str().context("socket path is not UTF-8")?,
    ];
    args.extend_from_slice(extra_args);
    let agent = ns.spawn(
        bin.to_str().context("binary path is not UTF-8")?,
        &args,
        envs,
    )?;
    let deadline = std::time::Instant::now() + ready;
    while std::time::Instant::now() < deadline {
        if admin.exists() {
            return Ok(agent);
        }
        if let Some(status) = agent.try_wait()? {
            anyhow::bail!("the agent exited ({status}): {}", agent.read_log());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    anyhow::bail!(
        "the agent did not open {}: {}",
        admin.display(),
        agent.read_log()
    )
}
