//! `node.control_plane` and `node.certificates.ca_client`: where a node gets its workloads,
//! services and policies (xDS) and its certificates (a CSR to a CA) instead of the file.
//!
//! ztunnel's environment variables override the file so one DaemonSet spec drives both
//! (`apply_env`): XDS_ADDRESS, CA_ADDRESS, XDS_ROOT_CA, CA_ROOT_CA, AUTH_TOKEN, CLUSTER_ID,
//! NODE_NAME, POD_NAME, POD_NAMESPACE, INSTANCE_IP and every ISTIO_META_* variable.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{de_duration, BoundedString, CertificatesConfig, Config};

/// istiod's discovery and CA port inside the cluster.
pub const DEFAULT_ISTIOD: &str = "https://istiod.istio-system.svc:15012";
/// Where istio-ca-root-cert is mounted in ztunnel's pod.
pub const DEFAULT_ROOT_CERT: &str = "/var/run/secrets/istio/root-cert.pem";
/// The projected service-account token with audience istio-ca.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/tokens/istio-token";

/// How a node authenticates to the control plane: `authorization: Bearer <token>`.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// Read on every (re)connect, so a rotated projected token is picked up.
    File(PathBuf),
    /// The token itself (AUTH_TOKEN set to something that is not a file).
    Inline(String),
    /// Send no token (a control plane that authenticates otherwise).
    None,
}

/// Never prints the token itself: configs are logged at start.
impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::File(p) => f.debug_tuple("File").field(p).finish(),
            TokenSource::Inline(t) => write!(f, "Inline(<redacted, {} bytes>)", t.len()),
            TokenSource::None => f.write_str("None"),
        }
    }
}

impl TokenSource {
    /// The current token with surrounding whitespace (the file's trailing newline) removed.
    /// A file that cannot be read, or holds nothing, is an error naming it.
    pub fn read(&self) -> Result<Option<String>, String> {
        let t = match self {
            TokenSource::None => return Ok(None),
            TokenSource::Inline(t) => t.clone(),
            TokenSource::File(p) => std::fs::read_to_string(p)
                .map_err(|e| format!("token file {}: {e}", p.display()))?,
        };
        let t = t.trim();
        if t.is_empty() {
            return Err(match self {
                TokenSource::File(p) => format!("token file {} is empty", p.display()),
                _ => "the token is empty".into(),
            });
        }
        if t.len() > 64 * 1024 || t.chars().any(|c| c.is_control()) {
            return Err("the token holds control characters or is over 64 KiB".into());
        }
        Ok(Some(t.to_string()))
    }
}

/// One gRPC server the node calls: address, the root it trusts, the token it sends.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpcTarget {
    /// `https://host:port`.
    pub address: String,
    /// PEM roots that must sign the server's certificate.
    pub root_cert: PathBuf,
    /// TLS name checked against the server's certificate; default: the address's host.
    pub server_name: Option<String>,
    pub token: TokenSource,
    /// Sent as the `clusterid` header.
    pub cluster_id: String,
}

/// `node.control_plane` as written in YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ControlPlaneRaw {
    #[serde(default = "default_address")]
    address: BoundedString,
    #[serde(default = "default_root")]
    root_cert: PathBuf,
    #[serde(default)]
    server_name: Option<BoundedString>,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    cluster_id: Option<BoundedString>,
    #[serde(default)]
    pod_name: Option<BoundedString>,
    #[serde(default)]
    pod_namespace: Option<BoundedString>,
    #[serde(default)]
    instance_ip: Option<IpAddr>,
    /// Node metadata sent to the control plane beside what the node fills in itself, by
    /// entry name (`AUTO_REGISTER_GROUP`, `LABELS`, ...): what the ISTIO_META_* variables give,
    /// written in the file (`zmesh-node join --istio-vm-dir` writes them here).
    #[serde(default)]
    metadata: BTreeMap<String, serde_json::Value>,
    /// Deprecated and ignored: pods that arrive over ZDS before their workload are no longer
    /// held (they are acked at once and fail closed until it arrives, docs/model.md). Accepted
    /// with any value so configs that set it keep loading; `Config::warnings` says so.
    #[serde(default)]
    workload_wait: Option<serde::de::IgnoredAny>,
}

/// Where workloads, services and policies come from when not from the file.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlPlaneConfig {
    pub target: GrpcTarget,
    /// This tunnel's own pod, for the node id `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`.
    pub pod_name: String,
    pub pod_namespace: String,
    pub instance_ip: Option<IpAddr>,
    /// ISTIO_META_* (strings) and ISTIO_METAJSON_* (JSON) entries, sent in the node metadata.
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// The config set the deprecated `workload_wait` (ignored; warned about at load).
    pub workload_wait_set: bool,
}

fn default_address() -> BoundedString {
    DEFAULT_ISTIOD.into()
}
fn default_root() -> PathBuf {
    PathBuf::from(DEFAULT_ROOT_CERT)
}

/// Bounds on `node.control_plane.metadata`: Istio's entries are a few dozen short values.
const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_BYTES: usize = 16 * 1024;

impl ControlPlaneRaw {
    /// What is wrong with the file's `metadata`, if anything: too many entries, a name that is
    /// not an ISTIO_META_* suffix (`[A-Z0-9_]`, 1-64), or over 16 KiB once encoded.
    pub(super) fn metadata_error(&self) -> Option<String> {
        let m = &self.metadata;
        if m.len() > MAX_METADATA_ENTRIES {
            return Some(format!(
                "{} entries, over the limit of {MAX_METADATA_ENTRIES}",
                m.len()
            ));
        }
        if let Some(k) = m.keys().find(|k| {
            k.is_empty()
                || k.len() > 64
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        }) {
            return Some(format!(
                "entry name {k:?} is not 1-64 characters of [A-Z0-9_]"
            ));
        }
        let size = serde_json::to_vec(m).map_or(usize::MAX, |v| v.len());
        (size > MAX_METADATA_BYTES)
            .then(|| format!("{size} bytes encoded, over the {MAX_METADATA_BYTES}-byte limit"))
    }

    pub(super) fn build(self, cluster: &str) -> ControlPlaneConfig {
        ControlPlaneConfig {
            target: GrpcTarget {
                address: self.address.0,
                root_cert: self.root_cert,
                server_name: self.server_name.map(|s| s.0),
                token: TokenSource::File(
                    self.token_file
                        .unwrap_or_else(|| PathBuf::from(DEFAULT_TOKEN_FILE)),
                ),
                cluster_id: self
                    .cluster_id
                    .map(|c| c.0)
                    .unwrap_or_else(|| cluster.into()),
            },
            pod_name: self.pod_name.map(|s| s.0).unwrap_or_else(|| "zmesh".into()),
            pod_namespace: self
                .pod_namespace
                .map(|s| s.0)
                .unwrap_or_else(|| "istio-system".into()),
            instance_ip: self.instance_ip,
            metadata: self.metadata,
            workload_wait_set: self.workload_wait.is_some(),
        }
    }
}

/// `node.certificates.ca_client` as written in YAML: every field but `ttl` defaults to the
/// control plane's (istiod serves both on 15012).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaClientRaw {
    #[serde(default)]
    pub(super) address: Option<BoundedString>,
    #[serde(default)]
    pub(super) root_cert: Option<PathBuf>,
    #[serde(default)]
    pub(super) server_name: Option<BoundedString>,
    #[serde(default)]
    pub(super) token_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) cluster_id: Option<BoundedString>,
    #[serde(default = "super::default_ttl", deserialize_with = "de_duration")]
    pub(super) ttl: Duration,
    /// Send `ImpersonatedIdentity` (a node tunnel asking for its pods' identities, as ztunnel
    /// does). A proxy asking for its own identity (the waypoint) sets it to false: istiod only
    /// lets node tunnels impersonate.
    #[serde(default = "yes")]
    pub(super) impersonate: bool,
}

fn yes() -> bool {
    true
}

impl CaClientRaw {
    /// Fills what is unset from the control plane; without one, `address` and `root_cert` are
    /// required.
    pub(super) fn build(
        self,
        cp: Option<&ControlPlaneConfig>,
        cluster: &str,
    ) -> Result<(GrpcTarget, Duration, bool), String> {
        let inherit = cp.map(|c| &c.target);
        let address =
            match (self.address, inherit) {
                (Some(a), _) => a.0,
                (None, Some(t)) => t.address.clone(),
                (None, None) => return Err(
                    "node.certificates.ca_client.address is required without node.control_plane"
                        .into(),
                ),
            };
        let root_cert =
            match (self.root_cert, inherit) {
                (Some(r), _) => r,
                (None, Some(t)) => t.root_cert.clone(),
                (None, None) => return Err(
                    "node.certificates.ca_client.root_cert is required without node.control_plane"
                        .into(),
                ),
            };
        let token = match (self.token_file, inherit) {
            (Some(f), _) => TokenSource::File(f),
            (None, Some(t)) => t.token.clone(),
            (None, None) => TokenSource::None,
        };
        Ok((
            GrpcTarget {
                address,
                root_cert,
                server_name: self
                    .server_name
                    .map(|s| s.0)
                    .or_else(|| inherit.and_then(|t| t.server_name.clone())),
                token,
                cluster_id: self
                    .cluster_id
                    .map(|c| c.0)
                    .or_else(|| inherit.map(|t| t.cluster_id.clone()))
                    .unwrap_or_else(|| cluster.into()),
            },
            self.ttl,
            self.impersonate,
        ))
    }
}

impl Config {
    /// Applies ztunnel's environment variables over the file (a drop-in DaemonSet sets them).
    /// XDS_ADDRESS alone turns the control plane on with its defaults. Values are checked like
    /// the file's: a bad INSTANCE_IP is an error naming the variable.
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        let var = |k: &str| lookup(k).filter(|v| !v.is_empty());
        if let Some(name) = var("NODE_NAME") {
            self.node.name = BoundedString(name);
        }
        let before = self.node.control_plane.as_ref().map(|c| c.target.clone());
        if let Some(addr) = var("XDS_ADDRESS") {
            let cp = self.node.control_plane.get_or_insert_with(|| {
                ControlPlaneRaw::default_for_env().build(&self.node.cluster)
            });
            cp.target.address = addr;
        }
        let cluster = var("CLUSTER_ID");
        if let Some(cp) = self.node.control_plane.as_mut() {
            if let Some(root) = var("XDS_ROOT_CA") {
                cp.target.root_cert = PathBuf::from(root);
            }
            if let Some(t) = var("AUTH_TOKEN") {
                cp.target.token = token_from_env(t);
            }
            if let Some(c) = &cluster {
                cp.target.cluster_id = c.clone();
            }
            if let Some(p) = var("POD_NAME") {
                cp.pod_name = p;
            }
            if let Some(p) = var("POD_NAMESPACE") {
                cp.pod_namespace = p;
            }
            if let Some(ip) = var("INSTANCE_IP") {
                cp.instance_ip = Some(
                    ip.parse()
                        .map_err(|_| format!("INSTANCE_IP = {ip:?} is not an IP address"))?,
                );
            }
        }
        let after = self.node.control_plane.as_ref().map(|c| c.target.clone());
        if let CertificatesConfig::CaClient { target, .. } = &mut self.node.certificates {
            // What the CA client took from the control plane follows the control plane's
            // overrides (XDS_ADDRESS also moves a CA that is istiod's); CA_* then win.
            if let (Some(old), Some(new)) = (&before, &after) {
                follow(&mut target.address, &old.address, &new.address);
                follow(&mut target.root_cert, &old.root_cert, &new.root_cert);
                follow(&mut target.server_name, &old.server_name, &new.server_name);
                follow(&mut target.token, &old.token, &new.token);
                follow(&mut target.cluster_id, &old.cluster_id, &new.cluster_id);
            }
            if let Some(a) = var("CA_ADDRESS") {
                target.address = a;
            }
            if let Some(r) = var("CA_ROOT_CA") {
                target.root_cert = PathBuf::from(r);
            }
            if let Some(t) = var("AUTH_TOKEN") {
                target.token = token_from_env(t);
            }
            if let Some(c) = &cluster {
                target.cluster_id = c.clone();
            }
        }
        if self.node.control_plane.is_some()
            && !(self.workloads.is_empty() && self.services.is_empty() && self.policies.is_empty())
        {
            return Err("XDS_ADDRESS turns the control plane on, but the file lists workloads, services or policies: they come from the control plane; remove them from the file".into());
        }
        Ok(())
    }

    /// `apply_env` with the process environment, ISTIO_META_* included.
    pub fn apply_process_env(&mut self) -> Result<(), String> {
        self.apply_env(|k| std::env::var(k).ok())?;
        self.apply_metadata_env(std::env::vars())
    }

    /// ISTIO_META_<K> (a string) and ISTIO_METAJSON_<K> (JSON, refused when it does not parse)
    /// become node metadata entry <K>, as ztunnel sends them to istiod.
    pub fn apply_metadata_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), String> {
        let Some(cp) = self.node.control_plane.as_mut() else {
            return Ok(());
        };
        for (k, v) in vars {
            if let Some(name) = k.strip_prefix("ISTIO_METAJSON_") {
                let json = serde_json::from_str(&v).map_err(|e| format!("{k} is not JSON: {e}"))?;
                cp.metadata.insert(name.to_string(), json);
            } else if let Some(name) = k.strip_prefix("ISTIO_META_") {
                cp.metadata
                    .insert(name.to_string(), serde_json::Value::String(v));
            }
        }
        Ok(())
    }
}

impl ControlPlaneRaw {
    fn default_for_env() -> ControlPlaneRaw {
        ControlPlaneRaw {
            address: default_address(),
            root_cert: default_root(),
            server_name: None,
            token_file: None,
            cluster_id: None,
            pod_name: None,
            pod_namespace: None,
            instance_ip: None,
            metadata: BTreeMap::new(),
            workload_wait: None,
        }
    }
}

/// Sets `field` to `new` when it held what the control plane held before (`old`).
fn follow<T: PartialEq + Clone>(field: &mut T, old: &T, new: &T) {
    if field == old {
        *field = new.clone();
    }
}

/// AUTH_TOKEN: a path to a file that exists, else the token itself.
fn token_from_env(v: String) -> TokenSource {
    let p = PathBuf::from(&v);
    if p.is_file() {
        TokenSource::File(p)
    } else {
        TokenSource::Inline(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        let text = format!("node:\n  name: n1\n{extra}  certificates:\n    ca_client: {{}}\n");
        Config::parse(&text, "test").unwrap()
    }

    #[test]
    fn the_ca_client_inherits_the_control_plane() {
        let c = cfg("  control_plane:\n    address: https://cp:15012\n    root_cert: /r.pem\n    token_file: /t\n    cluster_id: c1\n");
        let cp = c.node.control_plane.as_ref().unwrap();
        assert_eq!(cp.target.address, "https://cp:15012");
        let CertificatesConfig::CaClient {
            target,
            ttl,
            impersonate,
        } = &c.node.certificates
        else {
            panic!("ca_client expected")
        };
        assert!(*impersonate);
        assert_eq!(target, &cp.target);
        assert_eq!(*ttl, Duration::from_secs(24 * 3600));
    }

    #[test]
    fn the_deprecated_workload_wait_is_accepted_ignored_and_warned_about() {
        // Any value, even one that was never a duration: old configs must keep loading.
        for v in ["5s", "soon", "{ a: 1 }"] {
            let c = cfg(&format!(
                "  control_plane:\n    address: https://cp:15012\n    workload_wait: {v}\n"
            ));
            assert!(c.node.control_plane.as_ref().unwrap().workload_wait_set);
            let w = c.warnings().join("\n");
            assert!(
                w.contains("workload_wait is deprecated and ignored"),
                "{v}: {w}"
            );
        }
        let c = cfg("  control_plane:\n    address: https://cp:15012\n");
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        // Other unknown keys are still refused, naming the key.
        let text = "node:\n  name: n1\n  control_plane:\n    address: https://cp:15012\n    workload_wiat: 5s\n  certificates:\n    ca_client: {}\n";
        let e = Config::parse(text, "test").unwrap_err().to_string();
        assert!(e.contains("workload_wiat"), "{e}");
    }

    #[test]
    fn a_ca_client_without_control_plane_needs_an_address() {
        let text = "node:\n  name: n1\n  certificates:\n    ca_client: {}\n";
        let e = Config::parse(text, "test").unwrap_err().to_string();
        assert!(e.contains("ca_client.address is required"), "{e}");
    }

    #[test]
    fn ztunnel_env_names_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("tok");
        std::fs::write(&tok, "abc\n").unwrap();
        let mut c = cfg("  control_plane: {}\n");
        let env: BTreeMap<&str, String> = [
            ("XDS_ADDRESS", "https://istiod.x:15012".to_string()),
            ("CA_ADDRESS", "https://ca.x:15012".to_string()),
            ("XDS_ROOT_CA", "/x.pem".to_string()),
            ("CA_ROOT_CA", "/c.pem".to_string()),
            ("AUTH_TOKEN", tok.display().to_string()),
            ("CLUSTER_ID", "east".to_string()),
            ("NODE_NAME", "worker-1".to_string()),
            ("POD_NAME", "ztunnel-abc".to_string()),
            ("POD_NAMESPACE", "istio-system".to_string()),
            ("INSTANCE_IP", "10.0.0.5".to_string()),
        ]
        .into_iter()
        .collect();
        c.apply_env(|k| env.get(k).cloned()).unwrap();
        let cp = c.node.control_plane.as_ref().unwrap();
        assert_eq!(cp.target.address, "https://istiod.x:15012");
        assert_eq!(cp.target.root_cert, PathBuf::from("/x.pem"));
        assert_eq!(cp.target.token.read().unwrap().as_deref(), Some("abc"));
        assert_eq!(cp.target.cluster_id, "east");
        assert_eq!(c.node.name.0, "worker-1");
        assert_eq!(cp.pod_name, "ztunnel-abc");
        assert_eq!(cp.instance_ip, Some("10.0.0.5".parse().unwrap()));
        let CertificatesConfig::CaClient { target, .. } = &c.node.certificates else {
            panic!()
        };
        assert_eq!(target.address, "https://ca.x:15012");
        assert_eq!(target.root_cert, PathBuf::from("/c.pem"));
        assert_eq!(target.cluster_id, "east");
        // Not a file: the token itself.
        c.apply_env(|k| (k == "AUTH_TOKEN").then(|| "literal".to_string()))
            .unwrap();
        let cp = c.node.control_plane.as_ref().unwrap();
        assert_eq!(cp.target.token, TokenSource::Inline("literal".into()));
        let e = c
            .apply_env(|k| (k == "INSTANCE_IP").then(|| "nope".to_string()))
            .unwrap_err();
        assert!(e.contains("INSTANCE_IP"), "{e}");
    }

    #[test]
    fn istio_meta_variables_become_node_metadata() {
        let mut c = cfg("  control_plane: {}\n");
        let vars = [
            ("ISTIO_META_CLUSTER_ID", "east"),
            ("ISTIO_METAJSON_LABELS", r#"{"app": "ztunnel"}"#),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        c.apply_metadata_env(vars).unwrap();
        let md = &c.node.control_plane.as_ref().unwrap().metadata;
        assert_eq!(md.len(), 2);
        assert_eq!(md["CLUSTER_ID"], "east");
        assert_eq!(md["LABELS"]["app"], "ztunnel");
        let e = c
            .apply_metadata_env([("ISTIO_METAJSON_X".to_string(), "{nope".to_string())])
            .unwrap_err();
        assert!(e.contains("ISTIO_METAJSON_X is not JSON"), "{e}");
    }

    #[test]
    fn metadata_written_in_the_file_is_sent_and_bounded() {
        let c = cfg("  control_plane:\n    metadata: { AUTO_REGISTER_GROUP: billing, LABELS: { app: billing } }\n");
        let md = &c.node.control_plane.as_ref().unwrap().metadata;
        assert_eq!(md["AUTO_REGISTER_GROUP"], "billing");
        assert_eq!(md["LABELS"]["app"], "billing");
        let parse = |cp: &str| {
            crate::config::Config::parse(
                &format!("node:\n  name: n\n  control_plane:\n{cp}  certificates:\n    ca_client: {{}}\n"),
                "t",
            )
                .unwrap_err()
                .to_string()
        };
        let e = parse("    metadata: { lower: x }\n");
        assert!(
            e.contains("node.control_plane.metadata") && e.contains("\"lower\""),
            "{e}"
        );
        let many: String = (0..65).map(|i| format!("K{i}: v, ")).collect();
        let e = parse(&format!("    metadata: {{ {many} }}\n"));
        assert!(e.contains("65 entries"), "{e}");
        let e = parse(&format!(
            "    metadata: {{ BIG: {} }}\n",
            "x".repeat(17 * 1024)
        ));
        assert!(e.contains("byte limit"), "{e}");
    }

    #[test]
    fn an_inline_token_never_appears_in_debug_output() {
        let t = TokenSource::Inline("s3cr3t-token".into());
        let shown = format!("{t:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn tokens_are_trimmed_and_empty_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "  tok\r\n").unwrap();
        assert_eq!(
            TokenSource::File(p.clone()).read().unwrap().as_deref(),
            Some("tok")
        );
        std::fs::write(&p, "\n").unwrap();
        assert!(TokenSource::File(p.clone())
            .read()
            .unwrap_err()
            .contains("empty"));
        std::fs::write(&p, "a\nb").unwrap();
        assert!(TokenSource::File(p).read().is_err());
        assert!(TokenSource::File("/nonexistent/t".into())
            .read()
            .unwrap_err()
            .contains("/nonexistent/t"));
    }

    #[test]
    fn the_ca_client_follows_the_control_plane_overrides_it_inherited() {
        let mut c = cfg("  control_plane: {}\n");
        let env: BTreeMap<&str, String> = [
            ("XDS_ADDRESS", "https://istiod.x:15012".to_string()),
            ("XDS_ROOT_CA", "/x.pem".to_string()),
        ]
        .into_iter()
        .collect();
        c.apply_env(|k| env.get(k).cloned()).unwrap();
        let CertificatesConfig::CaClient { target, .. } = &c.node.certificates else {
            panic!()
        };
        assert_eq!(target.address, "https://istiod.x:15012");
        assert_eq!(target.root_cert, PathBuf::from("/x.pem"));
    }

    #[test]
    fn the_cluster_id_defaults_to_the_nodes_cluster() {
        let c = cfg("  cluster: east\n  control_plane: {}\n");
        assert_eq!(
            c.node.control_plane.as_ref().unwrap().target.cluster_id,
            "east"
        );
        let CertificatesConfig::CaClient { target, .. } = &c.node.certificates else {
            panic!()
        };
        assert_eq!(target.cluster_id, "east");
        let c = cfg("  control_plane: { cluster_id: west }\n");
        assert_eq!(
            c.node.control_plane.as_ref().unwrap().target.cluster_id,
            "west"
        );
        let c = cfg("  control_plane: {}\n");
        assert_eq!(
            c.node.control_plane.as_ref().unwrap().target.cluster_id,
            "Kubernetes"
        );
    }

    #[test]
    fn xds_address_with_file_workloads_is_refused() {
        let text = "node:\n  name: n1\n  certificates:\n    file_ca: { dir: /ca }\nworkloads:\n  - {uid: a, name: a, namespace: ns, addresses: [10.0.0.1], node: n1}\n";
        let mut c = Config::parse(text, "t").unwrap();
        let e = c
            .apply_env(|k| (k == "XDS_ADDRESS").then(|| "https://cp:15012".to_string()))
            .unwrap_err();
        assert!(e.contains("remove them from the file"), "{e}");
    }

    #[test]
    fn a_control_plane_excludes_file_workloads() {
        let text = "node:\n  name: n1\n  control_plane: {}\n  certificates:\n    ca_client: {}\nworkloads:\n  - {uid: a, name: a, namespace: ns, addresses: [10.0.0.1], node: n1}\n";
        let e = Config::parse(text, "test").unwrap_err().to_string();
        assert!(e.contains("node.control_plane"), "{e}");
    }
}
