//! The files Istio's VM tooling generates for a WorkloadGroup (`istioctl x workload entry
//! configure`): `cluster.env`, `mesh.yaml`, `root-cert.pem`, `istio-token` and `hosts`, read into
//! what a zmesh node needs to join that mesh through istiod (`zmesh-node join --istio-vm-dir`,
//! docs/model.md "Joining from Istio's VM files").
//!
//! Field names are Istio's (`ISTIO_META_*`, `SERVICE_ACCOUNT`, `discoveryAddress`); the
//! parsing is strict: a line that is not `KEY=VALUE`, an unterminated quote, a JSON metadata
//! value that does not parse or a missing required setting is an error naming the file, the
//! line and what was wrong.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The largest of these files Istio writes is a few KiB; anything bigger is not one of them.
const MAX_FILE: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IstioVmError {
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("{file}:{line}: {reason}")]
    Line {
        file: String,
        line: usize,
        reason: String,
    },
    #[error("{file}: {key} is required")]
    Missing { file: String, key: String },
}

/// What the files say about the VM and the mesh it joins.
#[derive(Debug, Clone, PartialEq)]
pub struct IstioVm {
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    /// `ISTIO_META_NETWORK` ("" when unset: Istio's default network).
    pub network: String,
    pub cluster_id: String,
    /// `ISTIO_META_AUTO_REGISTER_GROUP`: the WorkloadGroup istiod registers the VM under.
    pub auto_register_group: Option<String>,
    /// istiod's `host:port` (`discoveryAddress`), and the address `hosts` gives that host, if any.
    pub discovery_host: String,
    pub discovery_port: u16,
    pub discovery_ip: Option<IpAddr>,
    pub root_cert: PathBuf,
    pub token_file: PathBuf,
    /// Every `ISTIO_META_*` (strings) and `ISTIO_METAJSON_*` (JSON) entry, by name without the
    /// prefix, as ztunnel sends them in the node metadata.
    pub metadata: BTreeMap<String, serde_json::Value>,
}

fn read(dir: &Path, name: &str) -> Result<String, IstioVmError> {
    let path = dir.join(name);
    let err = |reason: String| IstioVmError::File {
        file: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(&path).map_err(|e| err(e.to_string()))?;
    if meta.len() > MAX_FILE {
        return Err(err(format!(
            "{} bytes, over the {MAX_FILE}-byte limit",
            meta.len()
        )));
    }
    std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))
}

/// `cluster.env`: `KEY=VALUE` lines, the value bare or in single or double quotes; blank lines
/// and `#` comments are skipped. A key given twice is an error (which one would count?).
pub fn parse_env(file: &str, text: &str) -> Result<BTreeMap<String, String>, IstioVmError> {
    let mut out = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: &str| IstioVmError::Line {
            file: file.to_string(),
            line: i + 1,
            reason: reason.to_string(),
        };
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| bad("expected KEY=VALUE"))?;
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(bad("a key is upper-case letters, digits and `_`"));
        }
        let value = match value.as_bytes().first() {
            Some(q @ (b'\'' | b'"')) => {
                let q = *q as char;
                let inner = &value[1..];
                let end = inner.find(q).ok_or_else(|| bad("unterminated quote"))?;
                if !inner[end + 1..].trim().is_empty() {
                    return Err(bad("text after the closing quote"));
                }
                inner[..end].to_string()
            }
            _ => value.trim().to_string(),
        };
        if value.chars().any(char::is_control) {
            return Err(bad("a value may not hold control characters"));
        }
        if out.insert(key.to_string(), value).is_some() {
            return Err(bad(&format!("{key} is set twice")));
        }
    }
    Ok(out)
}

/// `hosts`: `IP NAME...` lines; the address given for `host`, if any.
pub fn host_address(text: &str, host: &str) -> Option<IpAddr> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let ip = parts.next()?.parse::<IpAddr>().ok()?;
            parts.any(|n| n == host).then_some(ip)
        })
        .next()
}

impl IstioVm {
    /// Reads the five files from `dir`.
    pub fn load(dir: &Path) -> Result<IstioVm, IstioVmError> {
        let env_file = dir.join("cluster.env").display().to_string();
        let env = parse_env(&env_file, &read(dir, "cluster.env")?)?;
        let mesh_file = dir.join("mesh.yaml").display().to_string();
        let mesh: serde_yaml::Value =
            serde_yaml::from_str(&read(dir, "mesh.yaml")?).map_err(|e| IstioVmError::File {
                file: mesh_file.clone(),
                reason: e.to_string(),
            })?;
        let required = |key: &str| -> Result<String, IstioVmError> {
            env.get(key)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or_else(|| IstioVmError::Missing {
                    file: env_file.clone(),
                    key: key.to_string(),
                })
        };
        let namespace = match env.get("ISTIO_NAMESPACE").or(env.get("POD_NAMESPACE")) {
            Some(ns) if !ns.is_empty() => ns.clone(),
            _ => required("ISTIO_NAMESPACE")?,
        };
        let service_account = required("SERVICE_ACCOUNT")?;
        let trust_domain = env
            .get("TRUST_DOMAIN")
            .filter(|t| !t.is_empty())
            .cloned()
            .unwrap_or_else(|| "cluster.local".into());
        crate::identity::SpiffeId::new(&trust_domain, &namespace, &service_account).map_err(
            |e| IstioVmError::File {
                file: env_file.clone(),
                reason: format!(
                    "no valid identity from TRUST_DOMAIN, ISTIO_NAMESPACE and SERVICE_ACCOUNT: {e}"
                ),
            },
        )?;
        let discovery = mesh
            .get("defaultConfig")
            .and_then(|d| d.get("discoveryAddress"))
            .and_then(|a| a.as_str())
            .ok_or_else(|| IstioVmError::Missing {
                file: mesh_file.clone(),
                key: "defaultConfig.discoveryAddress".into(),
            })?;
        let (discovery_host, port) =
            discovery
                .rsplit_once(':')
                .ok_or_else(|| IstioVmError::File {
                    file: mesh_file.clone(),
                    reason: format!("discoveryAddress {discovery:?} is not host:port"),
                })?;
        let discovery_port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| IstioVmError::File {
                file: mesh_file.clone(),
                reason: format!("discoveryAddress {discovery:?} has no valid port"),
            })?;
        // `hosts` is optional: without it the name is resolved as usual.
        let discovery_ip = match read(dir, "hosts") {
            Ok(text) => host_address(&text, discovery_host),
            Err(_) if !dir.join("hosts").exists() => None,
            Err(e) => return Err(e),
        };
        for f in ["root-cert.pem", "istio-token"] {
            read(dir, f)?;
        }
        let mut metadata = BTreeMap::new();
        for (k, v) in &env {
            let name = k
                .strip_prefix("ISTIO_METAJSON_")
                .or_else(|| k.strip_prefix("ISTIO_META_"));
            if name.is_some_and(|n| n.is_empty() || n.len() > 64) {
                return Err(IstioVmError::File {
                    file: env_file.clone(),
                    reason: format!(
                        "{k}: the metadata name after the prefix must be 1-64 characters"
                    ),
                });
            }
            if let Some(name) = k.strip_prefix("ISTIO_METAJSON_") {
                let json = serde_json::from_str(v).map_err(|e| IstioVmError::File {
                    file: env_file.clone(),
                    reason: format!("{k} is not JSON: {e}"),
                })?;
                metadata.insert(name.to_string(), json);
            } else if let Some(name) = k.strip_prefix("ISTIO_META_") {
                metadata.insert(name.to_string(), serde_json::Value::String(v.clone()));
            }
        }
        let meta = |k: &str| {
            metadata
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        Ok(IstioVm {
            network: meta("NETWORK"),
            cluster_id: Some(meta("CLUSTER_ID"))
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| "Kubernetes".into()),
            auto_register_group: Some(meta("AUTO_REGISTER_GROUP")).filter(|g| !g.is_empty()),
            namespace,
            service_account,
            trust_domain,
            discovery_host: discovery_host.to_string(),
            discovery_port,
            discovery_ip,
            root_cert: dir.join("root-cert.pem"),
            token_file: dir.join("istio-token"),
            metadata,
        })
    }

    /// The `node:` section a VM with these files runs: workloads, services and policies from
    /// istiod, certificates from istiod's CA with this VM's identity. When `hosts` names an
    /// address for istiod (an east-west gateway's, typically), it is dialed and the certificate
    /// is still checked against istiod's name.
    ///
    /// The node presents itself as Istio's VM tooling makes a VM's proxy do: `NAMESPACE` is the
    /// VM's namespace, `INSTANCE_IPS` its address (`address`, when given), and every
    /// `ISTIO_META_*` entry of `cluster.env` is sent as node metadata, so a control plane
    /// auto-registers the VM into its `AUTO_REGISTER_GROUP`.
    pub fn node_section(&self, node_name: &str, address: Option<IpAddr>) -> String {
        // Every value is written as a JSON string, which YAML reads back verbatim whatever it
        // holds (a quote in a network name cannot change the config's shape).
        let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
        let address_ip = address;
        let (host, server_name) = match self.discovery_ip {
            Some(IpAddr::V6(ip)) => (format!("[{ip}]"), Some(&self.discovery_host)),
            Some(IpAddr::V4(ip)) => (ip.to_string(), Some(&self.discovery_host)),
            None => (self.discovery_host.clone(), None),
        };
        let address = format!("https://{host}:{}", self.discovery_port);
        let mut s = format!(
            "node:\n  name: {}\n  trust_domain: {}\n  cluster: {}\n  network: {}\n  control_plane:\n    address: {}\n    root_cert: {}\n    token_file: {}\n    cluster_id: {}\n    pod_name: {}\n    pod_namespace: {}\n    metadata: {}\n",
            q(node_name),
            q(&self.trust_domain),
            q(&self.cluster_id),
            q(&self.network),
            q(&address),
            q(&self.root_cert.display().to_string()),
            q(&self.token_file.display().to_string()),
            q(&self.cluster_id),
            q(node_name),
            q(&self.namespace),
            // JSON is YAML: the map is read back as it was written.
            serde_json::to_string(&self.metadata).expect("JSON values serialize"),
        );
        if let Some(ip) = address_ip {
            s += &format!("    instance_ip: {}\n", q(&ip.to_string()));
        }
        if let Some(name) = server_name {
            s += &format!("    server_name: {}\n", q(name));
        }
        s += "  certificates:\n    ca_client: {}\n";
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files shaped like the ones Istio's VM tooling writes (written here, for a made-up VM).
    fn files(env: &str, mesh: &str, hosts: Option<&str>) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cluster.env"), env).unwrap();
        std::fs::write(d.path().join("mesh.yaml"), mesh).unwrap();
        std::fs::write(d.path().join("root-cert.pem"), "root").unwrap();
        std::fs::write(d.path().join("istio-token"), "token").unwrap();
        if let Some(h) = hosts {
            std::fs::write(d.path().join("hosts"), h).unwrap();
        }
        d
    }

    const ENV: &str = "CANONICAL_REVISION='latest'\nCANONICAL_SERVICE='billing'\nISTIO_INBOUND_PORTS='*'\n\
ISTIO_METAJSON_LABELS='{\"app\":\"billing\",\"class\":\"vm\"}'\nISTIO_META_AUTO_REGISTER_GROUP='billing'\n\
ISTIO_META_CLUSTER_ID='east'\nISTIO_META_NETWORK='vm-net'\nISTIO_META_MESH_ID='mesh1'\nISTIO_NAMESPACE='finance'\n\
POD_NAMESPACE='finance'\nSERVICE_ACCOUNT='billing-sa'\nTRUST_DOMAIN='cluster.local'\n";
    const MESH: &str =
        "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n  meshId: mesh1\n";

    #[test]
    fn the_vm_files_give_identity_network_group_and_istiod() {
        let d = files(ENV, MESH, Some("203.0.113.9 istiod.istio-system.svc\n"));
        let vm = IstioVm::load(d.path()).unwrap();
        assert_eq!(
            (vm.namespace.as_str(), vm.service_account.as_str()),
            ("finance", "billing-sa")
        );
        assert_eq!(vm.network, "vm-net");
        assert_eq!(vm.cluster_id, "east");
        assert_eq!(vm.auto_register_group.as_deref(), Some("billing"));
        assert_eq!(vm.discovery_ip, Some("203.0.113.9".parse().unwrap()));
        assert_eq!(vm.metadata["LABELS"]["app"], "billing");
        assert_eq!(vm.metadata["AUTO_REGISTER_GROUP"], "billing");
        // The node section parses as a zmesh config: xDS and CA from istiod, dialed at the
        // hosts file's address, checked against istiod's name.
        let section = vm.node_section("vm-billing-1", Some("192.0.2.7".parse().unwrap()));
        let cfg = crate::config::Config::parse(&section, "generated").unwrap();
        assert_eq!(cfg.node.network.0, "vm-net");
        let cp = cfg.node.control_plane.unwrap();
        // What makes the control plane register the VM: its group, namespace, address and
        // labels, as the VM's proxy would send them.
        assert_eq!(cp.metadata["AUTO_REGISTER_GROUP"], "billing");
        assert_eq!(cp.metadata["LABELS"]["class"], "vm");
        assert_eq!(cp.metadata["MESH_ID"], "mesh1");
        assert_eq!(cp.pod_namespace, "finance");
        assert_eq!(cp.pod_name, "vm-billing-1");
        assert_eq!(cp.instance_ip, Some("192.0.2.7".parse().unwrap()));
        assert_eq!(cp.target.address, "https://203.0.113.9:15012");
        assert_eq!(
            cp.target.server_name.as_deref(),
            Some("istiod.istio-system.svc")
        );
        // Without `hosts`, the name itself is dialed.
        let d = files(ENV, MESH, None);
        let vm = IstioVm::load(d.path()).unwrap();
        assert_eq!(vm.discovery_ip, None);
        assert!(vm
            .node_section("n", None)
            .contains("address: \"https://istiod.istio-system.svc:15012\""));
    }

    #[test]
    fn broken_files_are_refused_naming_the_file_line_and_fault() {
        let err = |env: &str, mesh: &str| IstioVm::load(files(env, mesh, None).path()).unwrap_err();
        let e = err("SERVICE_ACCOUNT='x\n", MESH).to_string();
        assert!(e.contains("cluster.env:1: unterminated quote"), "{e}");
        let e = err("just words\n", MESH).to_string();
        assert!(e.contains(":1: expected KEY=VALUE"), "{e}");
        let e = err("SERVICE_ACCOUNT=a\nSERVICE_ACCOUNT=b\n", MESH).to_string();
        assert!(e.contains(":2: SERVICE_ACCOUNT is set twice"), "{e}");
        let e = err("ISTIO_NAMESPACE=ns\n", MESH).to_string();
        assert!(e.contains("SERVICE_ACCOUNT is required"), "{e}");
        let e = err(&format!("{ENV}ISTIO_METAJSON_X='{{nope'\n"), MESH).to_string();
        assert!(e.contains("ISTIO_METAJSON_X is not JSON"), "{e}");
        let e = err(ENV, "defaultConfig: {}\n").to_string();
        assert!(
            e.contains("defaultConfig.discoveryAddress is required"),
            "{e}"
        );
        let e = err(ENV, "defaultConfig: { discoveryAddress: istiod:0 }\n").to_string();
        assert!(e.contains("no valid port"), "{e}");
        let e = err("ISTIO_NAMESPACE=Bad_NS\nSERVICE_ACCOUNT=sa\n", MESH).to_string();
        assert!(e.contains("no valid identity"), "{e}");
        // A missing token is named.
        let d = files(ENV, MESH, None);
        std::fs::remove_file(d.path().join("istio-token")).unwrap();
        let e = IstioVm::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("istio-token"), "{e}");
    }
}
