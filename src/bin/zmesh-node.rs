//! zmesh-node: the per-node L4 tunnel.
//!
//! `zmesh-node run [--config FILE]` serves; `check-config FILE` validates (exit 64 when invalid);
//! `ca init` creates a CA; `ca token` makes a node bootstrap token and `ca serve` runs the CA
//! server of a standalone mesh (no node holds the CA key); `join`/`leave` make a host a node;
//! `connect` is client-only access for VMs and laptops (no capture, no root), and `ca csr` /
//! `ca sign` make its static certificate.

zmesh::binary_allocator!();

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use zmesh::config::{AccessLogFormat, Config, EMBEDDED_DEFAULT};
use zmesh::identity::FileCa;
use zmesh::proxy::admin::LogControl;

/// Exit code for an invalid config: sysexits.h EX_USAGE, as the project's conventions require.
const EXIT_INVALID_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "zmesh-node",
    version = zmesh_redirect::VERSION,
    about = "zmesh node tunnel (HBONE)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
// Parsed once at start; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    /// Run the tunnel (the default).
    Run {
        /// Config file; without it the embedded default is used.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file and exit (64 when invalid).
    CheckConfig { file: PathBuf },
    /// Certificate authority tools.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Make this host a mesh node: write its config and certificates and a hardened systemd
    /// unit that installs the capture rules before starting and keeps them through stops and
    /// crashes (fail closed: only `leave` removes them).
    Join(JoinArgs),
    /// Undo `join`: stop and disable the unit, remove the capture rules and every file written.
    Leave(HostArgs),
    /// Client-only mesh access for VMs and laptops: no capture rules, no root. Local port maps
    /// and a SOCKS5 listener reach mesh services over HBONE with this machine's certificate
    /// (the config's `connect:` section; the flags add to it).
    Connect(ConnectArgs),
}

#[derive(clap::Args)]
struct ConnectArgs {
    /// The config: this machine's `node:` and `certificates:`, the mesh's workloads and
    /// services (or `node.control_plane`), and `connect:` naming this machine's workload.
    #[arg(long, short)]
    config: PathBuf,
    /// A port map LISTEN=HOST:PORT (e.g. 127.0.0.1:5432=postgres.data.svc.cluster.local:5432),
    /// added to connect.forward; repeatable.
    #[arg(long = "forward", value_name = "LISTEN=HOST:PORT", value_parser = zmesh::config::connect::parse_forward_flag)]
    forwards: Vec<zmesh::config::connect::Forward>,
    /// A SOCKS5 listener (CONNECT, no authentication), e.g. 127.0.0.1:1080.
    #[arg(long, value_name = "ADDR")]
    socks5: Option<std::net::SocketAddr>,
    /// A source allowed on the listeners (CIDR or address), added to connect.allow_from;
    /// repeatable. With none anywhere, only loopback is allowed.
    #[arg(long = "allow-from", value_name = "CIDR", value_parser = zmesh::config::connect::parse_cidr)]
    allow_from: Vec<ipnet::IpNet>,
}

/// Where `join` writes and `leave` removes, and how they reach systemd and the rules.
#[derive(clap::Args)]
struct HostArgs {
    #[arg(long, default_value = "/etc/zmesh")]
    config_dir: PathBuf,
    #[arg(long, default_value = "/etc/systemd/system")]
    unit_dir: PathBuf,
    /// Do not call systemctl (write or remove the files only).
    #[arg(long)]
    no_systemctl: bool,
    /// zmesh-redirect binary; default: beside this one.
    #[arg(long)]
    redirect_bin: Option<PathBuf>,
}

#[derive(clap::Args)]
struct JoinArgs {
    /// The host's workload identity: <namespace>/<service-account>.
    #[arg(long, required_unless_present = "istio_vm_dir")]
    identity: Option<String>,
    /// The files Istio's VM tooling writes for a WorkloadGroup (`istioctl x workload entry
    /// configure`): cluster.env, mesh.yaml, root-cert.pem, istio-token, and optionally hosts.
    /// The node then takes its identity from them, and its workloads, services, policies and
    /// certificates from istiod, which registers the VM into its WorkloadGroup.
    /// Needs --name: the node its istio-token was made for.
    #[arg(long, requires = "name", conflicts_with_all = ["identity", "ca_dir", "ca_address", "ca_root", "ca_server_name", "join_token", "join_token_file", "cert", "key", "roots", "trust_domain"])]
    istio_vm_dir: Option<PathBuf>,
    /// Dev only: the CA directory itself (zmesh-node ca init); the CA key then sits on this
    /// host. Prefer --ca-address.
    #[arg(long, conflicts_with_all = ["cert", "key", "roots", "ca_address"])]
    ca_dir: Option<PathBuf>,
    /// The CA server (`zmesh-node ca serve`): https://HOST:PORT. Keys are made on this host
    /// and only CSRs leave it; needs --ca-root and a join token.
    #[arg(long, conflicts_with_all = ["cert", "key", "roots"], requires = "ca_root")]
    ca_address: Option<String>,
    /// The CA server's root certificate (the CA dir's root-cert.pem); copied under the config
    /// dir and trusted as the mesh root.
    #[arg(long)]
    ca_root: Option<PathBuf>,
    /// The TLS name checked on the CA server's certificate.
    #[arg(long, default_value = zmesh::controlplane::DEFAULT_SERVER_NAME)]
    ca_server_name: String,
    /// File holding this node's bootstrap token (`zmesh-node ca token`); copied (mode 0600).
    #[arg(long, conflicts_with = "join_token")]
    join_token_file: Option<PathBuf>,
    /// The bootstrap token itself (visible in the process list: prefer --join-token-file).
    #[arg(long)]
    join_token: Option<String>,
    /// Certificates provisioned elsewhere (Vault, cert-manager): leaf chain, key, trust bundle.
    #[arg(long, requires_all = ["key", "roots"])]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    #[arg(long)]
    roots: Option<PathBuf>,
    /// The workload address; default: the first non-loopback IPv4 of this host.
    #[arg(long)]
    address: Option<std::net::IpAddr>,
    /// Node name; default: the host name.
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = zmesh::config::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Inbound ports whose plaintext is captured (comma-separated).
    #[arg(long, value_delimiter = ',')]
    inbound_ports: Vec<u16>,
    #[command(flatten)]
    host: HostArgs,
}

fn beside_me(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(format!("/usr/local/bin/{name}")))
}

/// The first non-loopback IPv4 address of this host.
fn host_address() -> Option<std::net::IpAddr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|i| {
        let a = i.address?.as_sockaddr_in()?.ip();
        (!a.is_loopback()).then_some(std::net::IpAddr::V4(a))
    })
}

/// Where a host's certificates come from, as the join flags say.
fn join_certs(a: &JoinArgs) -> anyhow::Result<zmesh::host::JoinCerts> {
    use zmesh::host::JoinCerts;
    Ok(match (&a.ca_address, &a.ca_dir, &a.cert, &a.key, &a.roots) {
        (Some(address), None, None, None, None) => {
            let token = match (&a.join_token_file, &a.join_token) {
                (Some(f), None) => zmesh::config::control_plane::TokenSource::File(f.clone()),
                (None, Some(t)) => zmesh::config::control_plane::TokenSource::Inline(t.clone()),
                _ => anyhow::bail!("--ca-address needs --join-token-file (or --join-token)"),
            };
            let token = token
                .read()
                .map_err(anyhow::Error::msg)?
                .ok_or_else(|| anyhow::anyhow!("the join token is empty"))?;
            let root = a.ca_root.clone().expect("clap requires --ca-root");
            JoinCerts::ca_server(address.clone(), root, a.ca_server_name.clone(), token)?
        }
        (None, Some(dir), None, None, None) => JoinCerts::FileCa(dir.clone()),
        (None, None, Some(cert), Some(key), Some(roots)) => JoinCerts::Static {
            cert: cert.clone(),
            key: key.clone(),
            roots: roots.clone(),
        },
        _ => anyhow::bail!(
            "give one of --ca-address (with --ca-root and a join token), --ca-dir (dev only), --cert, --key and --roots, or --istio-vm-dir"
        ),
    })
}

fn join(a: JoinArgs) -> anyhow::Result<()> {
    use zmesh::host::{JoinCerts, JoinSpec};
    let (namespace, service_account, trust_domain, certs) = match &a.istio_vm_dir {
        Some(dir) => {
            let vm = zmesh::istio_vm::IstioVm::load(dir)?;
            (
                vm.namespace.clone(),
                vm.service_account.clone(),
                vm.trust_domain.clone(),
                JoinCerts::IstioVm(Box::new(vm)),
            )
        }
        None => {
            let identity = a.identity.as_deref().unwrap_or_default();
            let (ns, sa) = zmesh::host::parse_identity(identity, &a.trust_domain)?;
            (ns, sa, a.trust_domain.clone(), join_certs(&a)?)
        }
    };
    let node_name = match a.name {
        Some(n) => n,
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    let address = match a.address.or_else(host_address) {
        Some(ip) => ip,
        None => anyhow::bail!("no non-loopback IPv4 address found; pass --address"),
    };
    let spec = JoinSpec {
        namespace,
        service_account,
        node_name,
        address,
        trust_domain,
        certs,
        config_dir: a.host.config_dir,
        node_bin: std::env::current_exe()?,
        redirect_bin: a
            .host
            .redirect_bin
            .unwrap_or_else(|| beside_me("zmesh-redirect")),
        inbound_ports: a.inbound_ports,
    };
    // Refuse a config that would not start.
    Config::parse(&zmesh::host::render_config(&spec), "join")?;
    let written = zmesh::host::write_join(&spec, &a.host.unit_dir)?;
    for p in &written {
        println!("wrote {}", p.display());
    }
    if !a.host.no_systemctl {
        zmesh::host::run(std::process::Command::new("systemctl").arg("daemon-reload"))?;
        zmesh::host::run(std::process::Command::new("systemctl").args([
            "enable",
            "--now",
            zmesh::host::UNIT_NAME,
        ]))?;
        println!("started {}", zmesh::host::UNIT_NAME);
    }
    Ok(())
}

fn leave(a: HostArgs) -> anyhow::Result<()> {
    let HostArgs {
        config_dir,
        no_systemctl,
        redirect_bin,
        ..
    } = a;
    if !no_systemctl {
        // The unit keeps the capture rules through a stop (fail closed); they go below.
        zmesh::host::run(std::process::Command::new("systemctl").args([
            "disable",
            "--now",
            zmesh::host::UNIT_NAME,
        ]))?;
    }
    // Leaving is the one place the rules are removed (idempotent, so a unit that never
    // started is fine too).
    let redirect = redirect_bin.unwrap_or_else(|| beside_me("zmesh-redirect"));
    zmesh::host::run(std::process::Command::new(&redirect).args(["host", "uninstall"]))?;
    for p in zmesh::host::remove_join(&config_dir)? {
        println!("removed {}", p.display());
    }
    if !no_systemctl {
        zmesh::host::run(std::process::Command::new("systemctl").arg("daemon-reload"))?;
    }
    Ok(())
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a self-signed CA: for `ca serve`, or (dev only) for nodes' `file_ca`.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = zmesh::config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Write a CRL signed by the CA revoking leaf serials (hex, as the logs show them). Point
    /// `node.crl` at it: nodes re-read it and cut live tunnels of the revoked peers.
    Crl {
        #[arg(long)]
        dir: PathBuf,
        /// Serial to revoke; repeat for several (none writes an empty CRL).
        #[arg(long = "revoke")]
        serials: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        /// How long the CRL is valid (next update).
        #[arg(long, default_value = "168h", value_parser = zmesh::config::parse_duration)]
        validity: std::time::Duration,
    },
    /// Make a bootstrap token for a node (printed once; the CA dir keeps only its hash), or
    /// with --revoke remove every token of that node. A running `ca serve` picks it up.
    Token {
        #[arg(long)]
        dir: PathBuf,
        /// The node's name, as workloads' `node` in the mesh file names it.
        #[arg(long)]
        node: String,
        #[arg(long)]
        revoke: bool,
    },
    /// Make a key and a certificate signing request for a workload identity, on the machine
    /// that will use them (the key never leaves it): the first step of a static certificate
    /// for `zmesh-node connect`. Then `ca sign` on the CA's machine.
    Csr {
        /// <namespace>/<service-account>.
        #[arg(long)]
        identity: String,
        #[arg(long, default_value = zmesh::config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Where the private key goes (created mode 0600; an existing file is not replaced).
        #[arg(long)]
        key_out: PathBuf,
        #[arg(long)]
        csr_out: PathBuf,
    },
    /// Sign a CSR (`ca csr`) with the CA in --dir: writes the certificate chain (PEM) for
    /// `certificates.static`; the mesh root to trust is the CA dir's root-cert.pem.
    Sign {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        csr: PathBuf,
        /// The identity the operator means to sign, <namespace>/<service-account>: the CSR's
        /// must be exactly this one, or nothing is signed.
        #[arg(long)]
        identity: String,
        /// Where the chain is written; never over an existing file, never inside --dir.
        #[arg(long)]
        out: PathBuf,
        /// How long the certificate is valid. A static certificate is not renewed by the node:
        /// sign a new one before it expires.
        #[arg(long, default_value = "720h", value_parser = zmesh::config::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Serve the CA to the mesh's nodes: signs a node's CSR for an identity only when the mesh
    /// file puts a workload with that identity on that node (authenticated by its token).
    Serve {
        #[arg(long)]
        dir: PathBuf,
        /// The mesh model (a zmesh config file: its workloads and their nodes); re-read when it
        /// changes or on SIGHUP.
        #[arg(long)]
        mesh: PathBuf,
        #[arg(long, default_value = zmesh::controlplane::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
        /// Extra DNS names for the server's certificate (it always has `zmesh-ca`).
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Also serve the mesh file's workloads, services and policies over xDS (delta ADS, as
        /// istiod does), to nodes authenticated by their token: their files then need none.
        #[arg(long)]
        xds: bool,
    },
}

fn main() -> ExitCode {
    declare_allocator();
    let cli = Cli::parse();
    match cli.cmd.unwrap_or(Cmd::Run { config: None }) {
        Cmd::CheckConfig { file } => match Config::load(&file) {
            Ok(cfg) => {
                // A broken policy would run (as deny-all over its scope), but it is still an
                // error in the file: report every one.
                let policies = cfg.policy_set();
                if !policies.errors().is_empty() {
                    for e in policies.errors() {
                        eprintln!("{}: {e}", file.display());
                    }
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
                for w in cfg.warnings() {
                    eprintln!("{}: warning: {w}", file.display());
                }
                // The file is valid; whether the certificate material it names is there is a
                // property of the machine it runs on, so a warning, not a failure.
                if let Err(e) =
                    zmesh::proxy::load_certificates(&cfg, Arc::new(zmesh::identity::SystemClock))
                {
                    eprintln!(
                        "{}: warning: {e}: the node will not start until it is there",
                        file.display()
                    );
                }
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_INVALID_CONFIG)
            }
        },
        Cmd::Ca {
            cmd: CaCmd::Init { dir, trust_domain },
        } => match FileCa::init(&dir, &trust_domain) {
            Ok(()) => {
                println!(
                    "created CA for trust domain {trust_domain} in {}",
                    dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ca init: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Ca {
            cmd:
                CaCmd::Crl {
                    dir,
                    serials,
                    out,
                    validity,
                },
        } => {
            let written = FileCa::load(&dir)
                .map_err(|e| e.to_string())
                .and_then(|ca| {
                    ca.crl_pem(&serials, std::time::SystemTime::now(), validity)
                        .map_err(|e| e.to_string())
                })
                .and_then(|pem| {
                    // Written beside and renamed over, so a watching node never reads half a file.
                    let tmp = out.with_extension("tmp");
                    std::fs::write(&tmp, pem)
                        .and_then(|()| std::fs::rename(&tmp, &out))
                        .map_err(|e| format!("{}: {e}", out.display()))
                });
            match written {
                Ok(()) => {
                    println!(
                        "wrote CRL revoking {} serial(s) to {}",
                        serials.len(),
                        out.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ca crl: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Ca {
            cmd: CaCmd::Token { dir, node, revoke },
        } => {
            use zmesh::controlplane::tokens;
            if revoke {
                match tokens::revoke(&dir, &node) {
                    Ok(n) => {
                        eprintln!("revoked {n} token(s) of node {node}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("ca token: {e}");
                        ExitCode::FAILURE
                    }
                }
            } else {
                match tokens::create(&dir, &node) {
                    Ok(token) => {
                        // The only copy: stdout alone, so it can be piped into a file.
                        println!("{token}");
                        eprintln!("token for node {node} created; it is shown only once");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("ca token: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
        }
        Cmd::Ca {
            cmd:
                CaCmd::Serve {
                    dir,
                    mesh,
                    listen,
                    server_names,
                    xds,
                },
        } => match ca_serve(dir, mesh, listen, server_names, xds) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ca serve: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Join(args) => match join(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("join: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Ca {
            cmd:
                CaCmd::Csr {
                    identity,
                    trust_domain,
                    key_out,
                    csr_out,
                },
        } => match make_csr(&identity, &trust_domain, &key_out, &csr_out) {
            Ok(()) => {
                println!(
                    "wrote key {} and CSR {}",
                    key_out.display(),
                    csr_out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ca csr: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Ca {
            cmd:
                CaCmd::Sign {
                    dir,
                    csr,
                    identity,
                    out,
                    ttl,
                },
        } => match sign_csr(&dir, &csr, &identity, &out, ttl) {
            Ok(id) => {
                println!("wrote certificate for {id} to {}", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ca sign: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Connect(args) => connect_main(args),
        Cmd::Leave(args) => match leave(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("leave: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Run { config } => {
            // Taken before the read: an edit during start-up is then seen by the watcher.
            let loaded = config.as_deref().and_then(zmesh::proxy::reload::stamp);
            // ztunnel's environment (XDS_ADDRESS, CA_ADDRESS, ...) overrides the file.
            let cfg = match &config {
                Some(path) => Config::load_effective(path),
                None => Config::parse(EMBEDDED_DEFAULT, "<embedded default>").and_then(|mut c| {
                    c.apply_process_env()
                        .map_err(|message| zmesh::config::ConfigError::Unlocated {
                            path: "<environment>".into(),
                            message,
                        })
                        .map(|()| c)
                }),
            };
            let cfg = match cfg {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            };
            match serve(cfg, None, config.map(|p| (p, loaded))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("zmesh-node: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn make_csr(
    identity: &str,
    trust_domain: &str,
    key_out: &std::path::Path,
    csr_out: &std::path::Path,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (ns, sa) = zmesh::host::parse_identity(identity, trust_domain)?;
    let id = zmesh::identity::SpiffeId::new(trust_domain, &ns, &sa)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = zmesh::identity::caclient::csr_pem(&id, &key)?;
    // create_new: never replace a key that may be in use.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key_out)
        .with_context(|| key_out.display().to_string())?;
    f.write_all(key.serialize_pem().as_bytes())?;
    // Nor a CSR file; a failure here takes the new key back, so a rerun starts clean.
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(csr_out)
        .and_then(|mut c| c.write_all(csr.as_bytes()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(key_out);
        return Err(e).with_context(|| csr_out.display().to_string());
    }
    Ok(())
}

/// The longest `ca sign --ttl`: a static certificate is never renewed by the node, so a long
/// one outlives any revocation plan.
const MAX_SIGN_TTL: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

fn sign_csr(
    dir: &std::path::Path,
    csr: &std::path::Path,
    identity: &str,
    out: &std::path::Path,
    ttl: std::time::Duration,
) -> anyhow::Result<zmesh::identity::SpiffeId> {
    use base64::Engine;
    use std::io::Write;
    anyhow::ensure!(
        ttl <= MAX_SIGN_TTL,
        "--ttl {ttl:?} is over the {MAX_SIGN_TTL:?} limit"
    );
    let out_dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if let (Ok(o), Ok(d)) = (out_dir.canonicalize(), dir.canonicalize()) {
        anyhow::ensure!(
            !o.starts_with(&d),
            "--out {} is inside the CA directory; refusing to write there",
            out.display()
        );
    }
    let ca = FileCa::load(dir)?;
    let text = std::fs::read(csr).with_context(|| csr.display().to_string())?;
    anyhow::ensure!(
        text.len() <= zmesh::identity::MAX_CSR_BYTES,
        "{}: over {} bytes",
        csr.display(),
        zmesh::identity::MAX_CSR_BYTES
    );
    let text = String::from_utf8(text).context("the CSR is not PEM text")?;
    let trust_domain = ca_trust_domain(&ca)?;
    let checked = zmesh::identity::check_csr(&text, &trust_domain)?;
    let (ns, sa) = zmesh::host::parse_identity(identity, &trust_domain)?;
    let meant = zmesh::identity::SpiffeId::new(&trust_domain, &ns, &sa)?;
    anyhow::ensure!(
        checked.identity == meant,
        "the CSR asks for {}, not {meant}; nothing signed",
        checked.identity
    );
    let signed = ca.sign_csr(&checked, ttl, std::time::SystemTime::now())?;
    let mut pem = String::new();
    for der in &signed.chain {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .and_then(|mut f| f.write_all(pem.as_bytes()))
        .with_context(|| format!("{} (never written over)", out.display()))?;
    Ok(checked.identity)
}

/// The trust domain a CA issues for: the one in its own certificate's URI SAN.
fn ca_trust_domain(ca: &FileCa) -> anyhow::Result<String> {
    let cert = zmesh::identity::load_certs_pem(&ca.dir().join(zmesh::identity::CA_CERT_FILE))?;
    let first = cert.first().context("the CA dir has no CA certificate")?;
    let (_, parsed) = x509_parser::parse_x509_certificate(first.as_ref())
        .map_err(|e| anyhow::anyhow!("the CA certificate does not parse: {e}"))?;
    for ext in parsed.extensions() {
        if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) =
            ext.parsed_extension()
        {
            for name in &san.general_names {
                if let x509_parser::extensions::GeneralName::URI(uri) = name {
                    if let Some(td) = uri.strip_prefix("spiffe://") {
                        return Ok(td.split('/').next().unwrap_or(td).to_string());
                    }
                }
            }
        }
    }
    Ok(zmesh::config::DEFAULT_TRUST_DOMAIN.to_string())
}

/// `zmesh-node connect`: load, add the flags, check, run (exit 64 for an invalid config).
fn connect_main(a: ConnectArgs) -> ExitCode {
    let origin = a.config.display().to_string();
    let loaded = zmesh::proxy::reload::stamp(&a.config);
    let cfg = match Config::load_effective(&a.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    let flags = zmesh::config::connect::ConnectFlags {
        forwards: a.forwards,
        socks5: a.socks5,
        allow_from: a.allow_from,
    };
    let settings = match cfg.connect_settings(&origin, &flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    if settings.forwards.is_empty() && settings.socks5.is_none() {
        eprintln!("{origin}: connect: nothing to listen on: add connect.forward or connect.socks5, or pass --forward LISTEN=HOST:PORT or --socks5 ADDR");
        return ExitCode::from(EXIT_INVALID_CONFIG);
    }
    if cfg.node.mode != zmesh::config::Mode::Host {
        eprintln!("{origin}: connect: node.mode must be host (connect proxies this machine's own connections)");
        return ExitCode::from(EXIT_INVALID_CONFIG);
    }
    match serve(cfg, Some(settings), Some((a.config, loaded))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zmesh-node connect: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn ca_serve(
    dir: PathBuf,
    mesh: PathBuf,
    listen: std::net::SocketAddr,
    server_names: Vec<String>,
    xds: bool,
) -> anyhow::Result<()> {
    init_logging(AccessLogFormat::Text);
    zmesh_redirect::logging::log_start("zmesh-node ca serve");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("zmesh-cp")
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        let mut opts = zmesh::controlplane::ServeOptions::new(dir, mesh, listen);
        opts.server_names = server_names;
        opts.xds = xds;
        let hup = opts.reload_now.clone();
        let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot install the SIGHUP handler")?;
        tokio::spawn(async move {
            while sighup.recv().await.is_some() {
                hup.notify_one();
            }
        });
        let cp = zmesh::controlplane::ControlPlane::bind(opts).await?;
        // Tests and scripts read the bound address (a port of 0 picks a free one).
        println!("listening on {}", cp.local_addr());
        let router = cp.router();
        let mut signals = Signals::new();
        cp.serve(router, async move { signals.next().await })
            .await?;
        tracing::info!("control plane stopped");
        Ok(())
    })
}

/// The process's subscriber: `ZMESH_LOG`/`RUST_LOG` filter and `LOG_FORMAT` format, shared with
/// the other binaries (`zmesh_redirect::logging`). Without `LOG_FORMAT`, `node.access_log: json`
/// still makes the whole log JSON, as it did before the variable existed.
fn init_logging(access_log: AccessLogFormat) -> Arc<dyn LogControl> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use zmesh_redirect::logging::{self, LogFormat};
    let (mut format, format_warning) = logging::log_format();
    let format_set = std::env::var(logging::FORMAT_ENV).is_ok_and(|v| !v.trim().is_empty());
    if !format_set && access_log == AccessLogFormat::Json {
        format = LogFormat::Json;
    }
    let initial = zmesh_redirect::log_filter();
    let (filter, filter_warning) = logging::env_filter();
    // The filter sits behind a reload handle so the admin server's /logging can change it.
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // Colour only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::registry()
        .with(filter)
        .with(logging::fmt_layer(
            format,
            zmesh::accesslog::NodeLogWriter::stderr(),
            ansi,
        ))
        .init();
    for w in [format_warning, filter_warning].into_iter().flatten() {
        tracing::warn!("{w}");
    }
    Arc::new(ReloadableFilter {
        handle,
        current: std::sync::Mutex::new(initial),
    })
}

/// `/logging` on the admin server: the current filter, replaceable at runtime.
struct ReloadableFilter {
    handle: tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    current: std::sync::Mutex<String>,
}

impl LogControl for ReloadableFilter {
    fn current(&self) -> String {
        self.current.lock().expect("poisoned").clone()
    }

    fn set(&self, filter: &str) -> Result<(), String> {
        let parsed = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
        self.handle.reload(parsed).map_err(|e| e.to_string())?;
        *self.current.lock().expect("poisoned") = filter.to_string();
        tracing::info!(filter, "log filter changed");
        Ok(())
    }
}

/// Every proxied connection holds two sockets; the distribution default of 1024 open files would
/// cap a node at ~500 connections. Raise the soft limit to the hard one, as ztunnel does.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise RLIMIT_NOFILE");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read RLIMIT_NOFILE"),
    }
}

/// What `serve` started: a node's listeners (`run`) or a client-only agent's (`connect`).
enum Started {
    Node(zmesh::proxy::Running),
    Connect(zmesh::proxy::connect::Connected),
}

impl Started {
    async fn stop(self) {
        match self {
            Started::Node(r) => r.stop().await,
            Started::Connect(c) => c.stop().await,
        }
    }
}

/// Runs a node until SIGTERM/SIGINT (or the admin's quit), then drains: `run` with `connect`
/// None, `zmesh-node connect` (unprivileged, its own listeners only) with its settings. A file
/// config is watched and re-read on SIGHUP; the embedded default never changes.
fn serve(
    cfg: Config,
    connect: Option<zmesh::config::connect::ConnectSettings>,
    path: Option<(PathBuf, zmesh::proxy::reload::Stamp)>,
) -> anyhow::Result<()> {
    let logs = init_logging(cfg.node.access_log);
    zmesh_redirect::logging::log_start(if connect.is_some() {
        "zmesh-node connect"
    } else {
        "zmesh-node"
    });
    raise_nofile_limit();
    let workers = zmesh::workers::detect(cfg.node.worker_threads).count;
    // Workers give their allocator caches back after a load, nudged from the control runtime.
    let rt = zmesh::alloc::trimming_runtime("zmesh-data", workers, Some(zmesh::proxy::control()))
        .context("cannot start the data-plane runtime")?;
    let result = rt.block_on(async move {
        log_effective(&cfg);
        let drain_timeout = cfg.node.drain_timeout;
        let (node, running) = match connect {
            // Workloads, services and certificate files follow the file; the listeners are fixed.
            Some(settings) => {
                let node = zmesh::proxy::Node::new_unprivileged(cfg)?;
                let _ = node.log_control.set(logs);
                let c = zmesh::proxy::connect::start(node.clone(), settings).await?;
                (node, Started::Connect(c))
            }
            None => {
                let node = zmesh::proxy::Node::new(cfg)?;
                let _ = node.log_control.set(logs);
                let r = zmesh::proxy::start(node.clone()).await?;
                (node, Started::Node(r))
            }
        };
        let hup = Arc::new(tokio::sync::Notify::new());
        if let Some((path, loaded)) = path {
            zmesh::proxy::control().spawn(zmesh::proxy::reload::watch(
                node.clone(),
                path,
                loaded,
                zmesh::proxy::reload::WATCH_INTERVAL,
                hup.clone(),
            ));
        }
        let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot install the SIGHUP handler")?;
        tokio::spawn(async move {
            while sighup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the config");
                hup.notify_one();
            }
        });
        let mut signals = Signals::new();
        tokio::select! {
            _ = signals.next() => {}
            _ = node.quit.notified() => tracing::info!("quit requested on the admin server"),
        }
        tracing::info!(
            active = node.active_connections(),
            ?drain_timeout,
            "stopping: no new connections; draining"
        );
        running.stop().await;
        // A second signal exits at once; otherwise connections get until the deadline.
        tokio::select! {
            left = zmesh::proxy::drain(&node, drain_timeout) => {
                tracing::info!(cut = left, "drain finished");
            }
            _ = signals.next() => tracing::info!("second signal: exiting now"),
        }
        Ok(())
    });
    // The access lines of the last connections are still queued: write them before exiting.
    zmesh::accesslog::close_node();
    result
}

/// The settings the node runs with, one readable line (never key material or tokens).
fn log_effective(cfg: &Config) {
    use zmesh::config::CertificatesConfig;
    let n = &cfg.node;
    let certificates = match &n.certificates {
        CertificatesConfig::FileCa { dir, ttl } => {
            format!("file_ca {} (dev only), ttl {ttl:?}", dir.display())
        }
        CertificatesConfig::Static { identities, .. } => {
            format!("static, {} identities", identities.len())
        }
        CertificatesConfig::CaClient { target, ttl, .. } => {
            format!("ca_client {}, ttl {ttl:?}", target.address)
        }
        CertificatesConfig::CaClientUnresolved(_) => "ca_client (unresolved)".into(),
    };
    let source = match &n.control_plane {
        Some(cp) => format!("xDS from {}", cp.target.address),
        None => format!(
            "file: {} workloads, {} services, {} policies",
            cfg.workloads.len(),
            cfg.services.len(),
            cfg.policies.len()
        ),
    };
    tracing::info!(
        node = %n.name,
        mode = ?n.mode,
        trust_domain = %n.trust_domain,
        bind = %n.bind,
        model = %source,
        certificates = %certificates,
        access_log = ?n.access_log,
        "effective config"
    );
}

/// SIGTERM and SIGINT, as one stream.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
        }
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
