//! Host packaging: `zmesh-node join` turns a VM (or ECS host) into a mesh node with one workload
//! identity, and `zmesh-node leave` undoes it.
//!
//! `join` writes the node config and certificates under a config directory, and a hardened
//! systemd unit whose ExecStartPre installs the capture rules. The unit never removes them: they
//! stay through stops, crashes and restarts, so while the tunnel is down captured traffic is
//! refused rather than sent in plaintext (fail closed). Only `leave` (or `zmesh-redirect host
//! uninstall`) removes them. Everything `join` writes is listed in a manifest file, so `leave`
//! removes exactly that.
//! Rendering is pure (tested against golden expectations); file and systemctl work is thin.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// What a host joins as.
#[derive(Debug, Clone)]
pub struct JoinSpec {
    /// `namespace/service-account` of the host's workload.
    pub namespace: String,
    pub service_account: String,
    pub node_name: String,
    pub address: IpAddr,
    pub trust_domain: String,
    pub certs: JoinCerts,
    pub config_dir: PathBuf,
    pub node_bin: PathBuf,
    pub redirect_bin: PathBuf,
    /// Inbound ports whose plaintext is captured (`zmesh-redirect host install --inbound-ports`).
    pub inbound_ports: Vec<u16>,
}

#[derive(Debug, Clone)]
pub enum JoinCerts {
    /// Dev only: the built-in file CA in this directory (copied nowhere; referenced), so the
    /// CA key is readable on this host.
    FileCa(PathBuf),
    /// The CA server (`zmesh-node ca serve`): keys are generated on the host and only CSRs
    /// leave it. Its root and the node's bootstrap token are copied into the config dir.
    CaServer {
        /// `https://host:port`.
        address: String,
        root: PathBuf,
        /// The TLS name on the server's certificate.
        server_name: String,
        token: Secret,
    },
    /// Certificates provisioned elsewhere (Vault, cert-manager): copied into the config dir.
    Static {
        cert: PathBuf,
        key: PathBuf,
        roots: PathBuf,
    },
    /// Istio's VM files for a WorkloadGroup (`--istio-vm-dir`): workloads, services, policies
    /// and certificates come from istiod (or a zmesh control plane), which auto-registers the
    /// VM. Its `root-cert.pem` and `istio-token` are copied into the config dir.
    IstioVm(Box<crate::istio_vm::IstioVm>),
}

/// Where an Istio VM's root and token go under the config dir.
pub const ISTIO_ROOT_FILE: &str = "certs/istio-root-cert.pem";
pub const ISTIO_TOKEN_FILE: &str = "certs/istio-token";

/// A bootstrap token: kept out of `Debug` output and logs.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl JoinCerts {
    /// The CA-server variant, checked: an `https://` address, a root file holding PEM
    /// certificates, a TLS server name and a token fit for a header.
    pub fn ca_server(
        address: String,
        root: PathBuf,
        server_name: String,
        token: String,
    ) -> Result<JoinCerts, HostError> {
        crate::grpc::parse_address(&address).map_err(|e| HostError::Ca(e.to_string()))?;
        let roots = crate::identity::load_certs_pem(&root)
            .map_err(|e| HostError::Ca(format!("--ca-root: {e}")))?;
        if roots.is_empty() {
            return Err(HostError::Ca(format!(
                "--ca-root {} holds no certificate",
                root.display()
            )));
        }
        rustls::pki_types::ServerName::try_from(server_name.as_str())
            .map_err(|_| HostError::Ca(format!("{server_name:?} is not a TLS server name")))?;
        let token = token.trim().to_string();
        if token.is_empty() || token.len() > 4096 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(HostError::Ca(
                "the join token must be 1-4096 printable characters".into(),
            ));
        }
        Ok(JoinCerts::CaServer {
            address,
            root,
            server_name,
            token: Secret(token),
        })
    }
}

/// Where the CA server's root and the node token go under the config dir.
pub const CA_ROOT_FILE: &str = "certs/root-cert.pem";
pub const TOKEN_FILE: &str = "certs/node-token";

/// The systemd unit's file name.
pub const UNIT_NAME: &str = "zmesh-node.service";
/// The list of files `join` wrote, read by `leave`.
pub const MANIFEST: &str = ".joined";

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("--identity must be <namespace>/<service-account>, got {0:?}")]
    Identity(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} failed: {1}")]
    Command(String, String),
    #[error("CA server: {0}")]
    Ca(String),
}

/// Splits `ns/sa`, checking both parts form a valid SPIFFE identity.
pub fn parse_identity(s: &str, trust_domain: &str) -> Result<(String, String), HostError> {
    let (ns, sa) = s
        .split_once('/')
        .ok_or_else(|| HostError::Identity(s.to_string()))?;
    crate::identity::SpiffeId::new(trust_domain, ns, sa)
        .map_err(|_| HostError::Identity(s.to_string()))?;
    Ok((ns.to_string(), sa.to_string()))
}

/// The node config `join` writes.
pub fn render_config(spec: &JoinSpec) -> String {
    let certs = match &spec.certs {
        JoinCerts::IstioVm(vm) => return render_istio_vm(spec, vm),
        JoinCerts::FileCa(dir) => format!("    file_ca: {{ dir: {} }}\n", dir.display()),
        // JSON strings are YAML strings: whatever the address holds, it stays one scalar.
        JoinCerts::CaServer {
            address,
            server_name,
            ..
        } => format!(
            "    ca_client:\n      address: {address}\n      root_cert: {dir}/{CA_ROOT_FILE}\n      server_name: {name}\n      token_file: {dir}/{TOKEN_FILE}\n",
            address = serde_json::Value::from(address.as_str()),
            name = serde_json::Value::from(server_name.as_str()),
            dir = spec.config_dir.display()
        ),
        JoinCerts::Static { .. } => format!(
            "    static:\n      roots: {dir}/certs/root-cert.pem\n      identities:\n        - {{ cert: {dir}/certs/cert-chain.pem, key: {dir}/certs/key.pem }}\n",
            dir = spec.config_dir.display()
        ),
    };
    format!(
        "# Written by `zmesh-node join`; `zmesh-node leave` removes it.\nnode:\n  name: {name}\n  trust_domain: {td}\n  access_log: json\n  certificates:\n{certs}workloads:\n  - uid: {name}/{ns}/{sa}\n    name: {name}\n    namespace: {ns}\n    service_account: {sa}\n    workload_type: vm\n    addresses: [{addr}]\n    node: {name}\n",
        name = spec.node_name,
        td = spec.trust_domain,
        ns = spec.namespace,
        sa = spec.service_account,
        addr = spec.address,
    )
}

/// The node config of a VM joining with Istio's files: everything but the node itself comes
/// from the control plane, so it lists no workloads.
fn render_istio_vm(spec: &JoinSpec, vm: &crate::istio_vm::IstioVm) -> String {
    let mut vm = vm.clone();
    vm.root_cert = spec.config_dir.join(ISTIO_ROOT_FILE);
    vm.token_file = spec.config_dir.join(ISTIO_TOKEN_FILE);
    format!(
        "# Written by `zmesh-node join --istio-vm-dir`; `zmesh-node leave` removes it.\n{}  access_log: json\n",
        vm.node_section(&spec.node_name, Some(spec.address))
    )
}

/// The hardened systemd unit: only NET_ADMIN and NET_RAW, a read-only system, the capture
/// rules installed before every start (idempotent) and never removed by the unit.
pub fn render_unit(spec: &JoinSpec) -> String {
    let ports = if spec.inbound_ports.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = spec.inbound_ports.iter().map(u16::to_string).collect();
        format!(" --inbound-ports {}", list.join(","))
    };
    format!(
        "# Written by `zmesh-node join`; `zmesh-node leave` removes it.
[Unit]
Description=zmesh node tunnel (HBONE)
Documentation=https://github.com/zmesh/zmesh
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStartPre={redirect} host install{ports}
ExecStart={node} run --config {dir}/node.yaml
ExecReload=/bin/kill -HUP $MAINPID
# Fail closed: nothing here removes the capture rules, so they stay installed while the tunnel
# is stopped, crashed or restarting. Captured connections then reach a closed port (15001
# outbound, 15006 inbound) and are refused: applications see connection errors, never
# plaintext on the wire. Only `zmesh-node leave` (or `zmesh-redirect host uninstall`) removes
# the rules. SSH (port 22) is never captured, so the host stays reachable meanwhile.
# SIGTERM drains (node.drain_timeout, 25 s); systemd waits a little longer before SIGKILL.
KillSignal=SIGTERM
TimeoutStopSec=35
# Any exit, a clean one included (POST /quitquitquit), is followed by a restart: with the rules
# in place, a tunnel that stays down cuts the host off. `systemctl stop` is never restarted.
Restart=always
RestartSec=2
LimitNOFILE=1048576
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictNamespaces=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RestrictRealtime=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
SystemCallArchitectures=native
# iptables takes its lock under /run; the config and certificates are read-only.
ReadWritePaths=/run
ReadOnlyPaths={dir}

[Install]
WantedBy=multi-user.target
",
        redirect = spec.redirect_bin.display(),
        node = spec.node_bin.display(),
        dir = spec.config_dir.display(),
    )
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> HostError + '_ {
    move |source| HostError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes the config, certificates and unit; returns the paths written (also recorded in the
/// manifest for `leave`).
pub fn write_join(spec: &JoinSpec, unit_dir: &Path) -> Result<Vec<PathBuf>, HostError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = &spec.config_dir;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut written = Vec::new();
    let mut put = |path: PathBuf, body: &[u8], mode: u32| -> Result<(), HostError> {
        use std::os::unix::fs::OpenOptionsExt;
        // The mode is set before any byte is written: a key or token is never readable by
        // others, not even for a moment (a file left by an earlier join included).
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(io(&path))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io(&path))?;
        std::io::Write::write_all(&mut f, body).map_err(io(&path))?;
        written.push(path);
        Ok(())
    };
    if let JoinCerts::Static { cert, key, roots } = &spec.certs {
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).map_err(io(&certs))?;
        for (src, name, mode) in [
            (cert, "cert-chain.pem", 0o644),
            (key, "key.pem", 0o600),
            (roots, "root-cert.pem", 0o644),
        ] {
            let body = std::fs::read(src).map_err(io(src))?;
            put(certs.join(name), &body, mode)?;
        }
    }
    if let JoinCerts::CaServer { root, token, .. } = &spec.certs {
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).map_err(io(&certs))?;
        let body = std::fs::read(root).map_err(io(root))?;
        put(dir.join(CA_ROOT_FILE), &body, 0o644)?;
        put(
            dir.join(TOKEN_FILE),
            format!("{}\n", token.expose()).as_bytes(),
            0o600,
        )?;
    }
    if let JoinCerts::IstioVm(vm) = &spec.certs {
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).map_err(io(&certs))?;
        let root = std::fs::read(&vm.root_cert).map_err(io(&vm.root_cert))?;
        put(dir.join(ISTIO_ROOT_FILE), &root, 0o644)?;
        let token = std::fs::read(&vm.token_file).map_err(io(&vm.token_file))?;
        put(dir.join(ISTIO_TOKEN_FILE), &token, 0o600)?;
    }
    put(dir.join("node.yaml"), render_config(spec).as_bytes(), 0o644)?;
    std::fs::create_dir_all(unit_dir).map_err(io(unit_dir))?;
    put(
        unit_dir.join(UNIT_NAME),
        render_unit(spec).as_bytes(),
        0o644,
    )?;
    let manifest: String = written
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    let mpath = dir.join(MANIFEST);
    std::fs::write(&mpath, manifest).map_err(io(&mpath))?;
    written.push(mpath);
    Ok(written)
}

/// Removes what `join` wrote (by its manifest), then the config dir if it is left empty.
pub fn remove_join(config_dir: &Path) -> Result<Vec<PathBuf>, HostError> {
    let mpath = config_dir.join(MANIFEST);
    let manifest = std::fs::read_to_string(&mpath).map_err(io(&mpath))?;
    let mut removed = Vec::new();
    for line in manifest.lines().filter(|l| !l.is_empty()) {
        let p = PathBuf::from(line);
        match std::fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&p)(e)),
        }
    }
    std::fs::remove_file(&mpath).map_err(io(&mpath))?;
    removed.push(mpath);
    let _ = std::fs::remove_dir(config_dir.join("certs"));
    let _ = std::fs::remove_dir(config_dir);
    Ok(removed)
}

/// Runs a command, naming it in the error.
pub fn run(cmd: &mut std::process::Command) -> Result<(), HostError> {
    let out = cmd
        .output()
        .map_err(|e| HostError::Command(format!("{cmd:?}"), e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HostError::Command(
            format!("{cmd:?}"),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(certs: JoinCerts) -> JoinSpec {
        JoinSpec {
            namespace: "shop".into(),
            service_account: "db".into(),
            node_name: "vm-7".into(),
            address: "10.0.0.7".parse().unwrap(),
            trust_domain: "cluster.local".into(),
            certs,
            config_dir: "/etc/zmesh".into(),
            node_bin: "/usr/local/bin/zmesh-node".into(),
            redirect_bin: "/usr/local/bin/zmesh-redirect".into(),
            inbound_ports: vec![5432],
        }
    }

    #[test]
    fn the_rendered_config_is_a_valid_node_config_with_one_workload() {
        for certs in [
            JoinCerts::FileCa("/var/lib/zmesh/ca".into()),
            JoinCerts::Static {
                cert: "/x/c.pem".into(),
                key: "/x/k.pem".into(),
                roots: "/x/r.pem".into(),
            },
            ca_server(),
        ] {
            let text = render_config(&spec(certs));
            let cfg = crate::config::Config::parse(&text, "join").unwrap();
            assert_eq!(cfg.workloads.len(), 1);
            let w = &cfg.workloads[0];
            assert_eq!((&*w.namespace, &*w.service_account), ("shop", "db"));
            assert_eq!(w.addresses, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
        }
    }

    fn ca_server() -> JoinCerts {
        JoinCerts::CaServer {
            address: "https://10.0.0.1:15012".into(),
            root: "/x/root.pem".into(),
            server_name: "zmesh-ca".into(),
            token: Secret("s3cret-token".into()),
        }
    }

    #[test]
    fn a_ca_server_join_points_the_ca_client_at_copies_under_the_config_dir() {
        use crate::config::control_plane::TokenSource;
        use crate::config::CertificatesConfig;
        let text = render_config(&spec(ca_server()));
        let cfg = crate::config::Config::parse(&text, "join").unwrap();
        let CertificatesConfig::CaClient { target, .. } = &cfg.node.certificates else {
            panic!("ca_client expected:\n{text}")
        };
        assert_eq!(target.address, "https://10.0.0.1:15012");
        assert_eq!(
            target.root_cert,
            PathBuf::from("/etc/zmesh/certs/root-cert.pem")
        );
        assert_eq!(target.server_name.as_deref(), Some("zmesh-ca"));
        assert_eq!(
            target.token,
            TokenSource::File("/etc/zmesh/certs/node-token".into())
        );
        // The token is in a file, never in the config or a debug dump.
        assert!(!text.contains("s3cret"), "{text}");
        assert!(!format!("{:?}", spec(ca_server())).contains("s3cret"));
    }

    #[test]
    fn a_ca_server_join_writes_the_token_private_and_no_key() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        crate::identity::FileCa::init(&ca, "cluster.local").unwrap();
        let certs = JoinCerts::ca_server(
            "https://10.0.0.1:15012".into(),
            ca.join(crate::identity::ROOT_CERT_FILE),
            "zmesh-ca".into(),
            "tok-123\n".into(),
        )
        .unwrap();
        let mut s = spec(certs);
        s.config_dir = tmp.path().join("etc");
        let written = write_join(&s, &tmp.path().join("units")).unwrap();
        let token = s.config_dir.join(TOKEN_FILE);
        assert_eq!(std::fs::read_to_string(&token).unwrap(), "tok-123\n");
        assert_eq!(
            std::fs::metadata(&token).unwrap().permissions().mode() & 0o777,
            0o600
        );
        for p in &written {
            let body = std::fs::read_to_string(p).unwrap();
            assert!(!body.contains("PRIVATE KEY"), "{}", p.display());
        }
        assert_eq!(remove_join(&s.config_dir).unwrap().len(), written.len());
        assert!(!s.config_dir.exists());
    }

    #[test]
    fn bad_ca_server_arguments_are_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root.pem");
        std::fs::write(&root, "not a certificate").unwrap();
        let ok_root = tmp.path().join("ca");
        crate::identity::FileCa::init(&ok_root, "cluster.local").unwrap();
        let ok_root = ok_root.join(crate::identity::ROOT_CERT_FILE);
        let cases: Vec<(&str, PathBuf, &str, &str, &str)> = vec![
            (
                "http://ca:15012",
                ok_root.clone(),
                "zmesh-ca",
                "t",
                "https://",
            ),
            (
                "https://ca:15012",
                root,
                "zmesh-ca",
                "t",
                "holds no PEM certificate",
            ),
            (
                "https://ca:15012",
                tmp.path().join("none"),
                "zmesh-ca",
                "t",
                "--ca-root",
            ),
            (
                "https://ca:15012",
                ok_root.clone(),
                "bad name!",
                "t",
                "TLS server name",
            ),
            (
                "https://ca:15012",
                ok_root.clone(),
                "zmesh-ca",
                " \n",
                "join token",
            ),
            ("https://ca:15012", ok_root, "zmesh-ca", "a b", "join token"),
        ];
        for (addr, root, name, token, want) in cases {
            let e = JoinCerts::ca_server(addr.into(), root, name.into(), token.into())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{addr} {name} {token:?}: {e}");
        }
    }

    #[test]
    fn the_unit_is_hardened_and_installs_the_capture_rules_without_removing_them() {
        let unit = render_unit(&spec(JoinCerts::FileCa("/ca".into())));
        // Fail closed: no stop-time command (ExecStop, ExecStopPost) touches the rules.
        let stop: Vec<&str> = unit.lines().filter(|l| l.starts_with("ExecStop")).collect();
        assert!(stop.is_empty(), "the unit runs {stop:?} on stop:\n{unit}");
        assert!(
            !unit
                .lines()
                .any(|l| l.starts_with("Exec") && l.contains("uninstall")),
            "{unit}"
        );
        for line in [
            "ExecStartPre=/usr/local/bin/zmesh-redirect host install --inbound-ports 5432",
            "Restart=always",
            "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW",
            "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "LimitNOFILE=1048576",
        ] {
            assert!(unit.lines().any(|l| l == line), "missing {line:?}:\n{unit}");
        }
    }

    #[test]
    fn identities_are_checked() {
        assert!(parse_identity("shop/db", "cluster.local").is_ok());
        for bad in ["shop", "shop/", "/db", "Shop/db", "shop/db/x"] {
            assert!(parse_identity(bad, "cluster.local").is_err(), "{bad}");
        }
    }
}
