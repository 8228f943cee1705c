//! `zmesh-redirect`: host capture (install, remove or print the rules), the node agent that
//! captures pods and hands them to the node tunnel, its `pod` admin client, and, when run with
//! `CNI_COMMAND` set, the chained CNI plugin. Parsing arguments is all it does; rule generation,
//! the agent and the CNI logic live in the library.
#![forbid(unsafe_code)]

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use zmesh_redirect::agent::{self, AddRequest, AgentConfig, Request};
use zmesh_redirect::k8s as agent_kube;
use zmesh_redirect::{apply, cni, health, zds, Backend, HostOptions, InboundPlaintext};

/// Invalid options, following the project-wide exit code for bad configuration (sysexits EX_USAGE).
const EXIT_INVALID_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "zmesh-redirect",
    version = zmesh_redirect::VERSION,
    about = "Traffic capture without eBPF for the zmesh node tunnel"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Capture in this host's own network namespace (VMs, ECS hosts, developer machines).
    Host {
        #[command(subcommand)]
        action: Action,
    },
    /// Run the node agent: capture enrolled pods and hand them to node tunnels over ZDS.
    Agent(AgentArgs),
    /// Enroll or remove a pod through the running agent (what the CNI plugin does).
    Pod {
        #[command(subcommand)]
        action: PodAction,
    },
    /// Chain the CNI plugin into the node's primary network config (as istio-cni does), or
    /// take it out again.
    Cni {
        #[command(subcommand)]
        action: CniAction,
    },
}

#[derive(Subcommand)]
enum CniAction {
    /// Install the plugin binary (atomically) and append the plugin as the LAST entry of the
    /// primary conflist; with --watch, keep it there when the primary CNI rewrites the file.
    Install {
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// The primary config's file name; default: the first config file by name.
        #[arg(long)]
        conflist: Option<String>,
        /// A JSON file holding the plugin entry (`{"type": "zmesh-redirect", ...}`); default:
        /// the entry with the agent's default admin socket.
        #[arg(long)]
        plugin_config: Option<PathBuf>,
        /// Do not copy the binary (it is installed by other means).
        #[arg(long)]
        no_binary: bool,
        /// Keep checking, every second, and put the entry back when it is gone.
        #[arg(long)]
        watch: bool,
    },
    /// Remove the plugin entry from every conflist (and the binary), leaving the rest as it was.
    Uninstall {
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// ZDS socket the node tunnels connect to.
    #[arg(long, default_value = zds::DEFAULT_SOCKET_PATH)]
    zds_socket: PathBuf,
    /// Admin socket for enrollment requests (mode 0600).
    #[arg(long, default_value = agent::DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
    #[arg(long, value_enum, default_value_t = BackendArg::Iptables)]
    backend: BackendArg,
    /// Readiness (`/readyz`) and liveness (`/healthz`) address, as istio-cni's; `off` disables.
    #[arg(long, default_value = health::DEFAULT_HEALTH_ADDR)]
    health_addr: health::EndpointAddr,
    /// Prometheus `/metrics` address, as istio-cni's; `off` disables.
    #[arg(long, default_value = health::DEFAULT_METRICS_ADDR)]
    metrics_addr: health::EndpointAddr,
    #[command(flatten)]
    enrollment: EnrollmentArgs,
}

/// Which pods are enrolled (docs/capture.md, "Enrollment").
#[derive(Args)]
struct EnrollmentArgs {
    /// `labels`: only pods meshed by `istio.io/dataplane-mode` (Kubernetes API); `all`: every pod
    /// the CNI plugin hands over; `auto`: `labels` when an API is configured (--kube-api,
    /// KUBECONFIG, or the in-cluster service account), else `all`.
    #[arg(long, value_enum, env = "ZMESH_ENROLL", default_value_t = EnrollArg::Auto)]
    enroll: EnrollArg,
    /// Kubernetes API server URL (instead of the in-cluster service account or KUBECONFIG).
    #[arg(long, env = "ZMESH_KUBE_API", value_name = "URL")]
    kube_api: Option<String>,
    /// Bearer token file for --kube-api.
    #[arg(
        long,
        env = "ZMESH_KUBE_TOKEN_FILE",
        value_name = "PATH",
        requires = "kube_api"
    )]
    kube_token_file: Option<PathBuf>,
    /// This node's name; only its pods are watched. Required with label enrollment.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Where the enrolled pods are recorded for a restart; default: beside the admin socket
    /// (`redirect.sock` → `redirect.pods.json`).
    #[arg(long, value_name = "PATH")]
    state_file: Option<PathBuf>,
    /// Namespaces never enrolled by label, whatever their labels (keep in step with the CNI
    /// plugin's `exclude_namespaces`).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "NAMESPACES",
        default_value = "kube-system"
    )]
    exclude_namespaces: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EnrollArg {
    Auto,
    Labels,
    All,
}

impl EnrollmentArgs {
    /// The API settings for label enrollment, `None` for `all`; an error names the missing piece.
    fn kube(&self) -> Result<Option<agent_kube::KubeSettings>, String> {
        let configured = self.kube_api.is_some()
            || std::env::var_os("KUBECONFIG").is_some()
            || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        let labels = match self.enroll {
            EnrollArg::All => false,
            EnrollArg::Labels => true,
            EnrollArg::Auto => configured,
        };
        if !labels {
            return Ok(None);
        }
        let node_name = self.node_name.clone().filter(|n| !n.is_empty()).ok_or(
            "label enrollment needs this node's name: set --node-name or NODE_NAME (in a \
             DaemonSet, from the downward API: fieldRef spec.nodeName)",
        )?;
        Ok(Some(agent_kube::KubeSettings {
            api_url: self.kube_api.clone(),
            token_file: self.kube_token_file.clone(),
            node_name,
        }))
    }
}

#[derive(Subcommand)]
enum PodAction {
    /// Capture the pod in NETNS and hand it to the node tunnel; returns once the tunnel acked.
    Add {
        #[arg(long)]
        netns: PathBuf,
        #[arg(long)]
        uid: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        /// Let inbound plaintext reach the app directly (the inbound capture bypass).
        #[arg(long)]
        no_inbound_capture: bool,
        /// Redirect the pod's DNS to the tunnel's DNS proxy.
        #[arg(long)]
        dns_capture: bool,
        #[arg(long, default_value = agent::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Forget the pod: the tunnels stop its proxy, and its rules go if its netns still exists.
    Del {
        #[arg(long)]
        uid: String,
        #[arg(long, default_value = agent::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Print the enrolled pod uids and the number of connected tunnels.
    List {
        #[arg(long, default_value = agent::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
}

#[derive(Subcommand)]
enum Action {
    /// Install the rules; running it again changes nothing.
    Install(HostArgs),
    /// Remove everything `install` added; succeeds when nothing is installed.
    Uninstall(HostArgs),
    /// Print the rules without applying them.
    Render(HostArgs),
}

#[derive(Args)]
struct HostArgs {
    #[arg(long, value_enum, default_value_t = BackendArg::Iptables)]
    backend: BackendArg,
    /// Local service ports whose inbound TCP from outside is captured (empty: no inbound capture).
    #[arg(long, value_delimiter = ',', value_name = "PORTS")]
    inbound_ports: Vec<u16>,
    /// Redirect plaintext to the inbound ports into the tunnel, or drop it (HBONE only).
    #[arg(long, value_enum, default_value_t = PlaintextArg::Allow)]
    inbound_plaintext: PlaintextArg,
    /// Destination ports never captured; 22 (SSH) is always added.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "PORTS",
        default_value = "22"
    )]
    exclude_ports: Vec<u16>,
    /// IPv4 destinations never captured outbound.
    #[arg(long, value_delimiter = ',', value_name = "CIDRS")]
    exclude_cidrs: Vec<IpNet>,
    /// The tunnel's uid, excluded from outbound capture in addition to its socket mark.
    #[arg(long, value_name = "UID")]
    tunnel_uid: Option<u32>,
    /// Redirect this host's DNS (UDP and TCP 53 to its resolvers) to the node's DNS proxy on
    /// 127.0.0.1:15053 (zmesh-node with `node.dns.enabled`).
    #[arg(long)]
    dns_capture: bool,
    /// The resolvers whose DNS is captured (IPv4); default: the nameservers of /etc/resolv.conf.
    #[arg(long, value_delimiter = ',', value_name = "IPS")]
    dns_servers: Vec<std::net::Ipv4Addr>,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Iptables,
    Nftables,
}

#[derive(Clone, Copy, ValueEnum)]
enum PlaintextArg {
    Allow,
    Deny,
}

impl BackendArg {
    fn backend(self) -> Backend {
        match self {
            BackendArg::Iptables => Backend::Iptables,
            BackendArg::Nftables => Backend::Nftables,
        }
    }
}

impl HostArgs {
    fn backend(&self) -> Backend {
        self.backend.backend()
    }

    fn options(&self) -> HostOptions {
        HostOptions {
            tunnel_uid: self.tunnel_uid,
            inbound_ports: self.inbound_ports.clone(),
            inbound_plaintext: match self.inbound_plaintext {
                PlaintextArg::Allow => InboundPlaintext::Allow,
                PlaintextArg::Deny => InboundPlaintext::Deny,
            },
            exclude_ports: self.exclude_ports.clone(),
            exclude_cidrs: self.exclude_cidrs.clone(),
            dns_capture: self.dns_capture,
            dns_servers: if self.dns_capture && self.dns_servers.is_empty() {
                resolv_conf_nameservers(RESOLV_CONF)
            } else {
                self.dns_servers.clone()
            },
            ..HostOptions::default()
        }
    }
}

/// Where `--dns-capture` finds the host's resolvers when `--dns-servers` is not given.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The IPv4 `nameserver` addresses of a resolv.conf (none when it cannot be read: the options'
/// validation then says what to pass instead).
fn resolv_conf_nameservers(path: &str) -> Vec<std::net::Ipv4Addr> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "nameserver").then(|| w.next()?.parse().ok())?
        })
        .collect()
}

fn main() -> ExitCode {
    // A container runtime runs CNI plugins with arguments in the environment, not on the command
    // line, so this must be decided before clap sees (and rejects) an empty argv.
    if let Some(command) = std::env::var_os(cni::COMMAND_ENV) {
        return cni_plugin(&command.to_string_lossy());
    }
    match Cli::parse().mode {
        Mode::Host { action } => host(action),
        Mode::Agent(args) => run_agent(args),
        Mode::Pod { action } => pod(action),
        Mode::Cni { action } => cni_install(action),
    }
}

fn cni_install(action: CniAction) -> ExitCode {
    use zmesh_redirect::cni_install as ci;
    zmesh_redirect::logging::init_stderr();
    let result = match action {
        CniAction::Install {
            conf_dir,
            bin_dir,
            conflist,
            plugin_config,
            no_binary,
            watch,
        } => (|| -> Result<(), String> {
            let plugin = match plugin_config {
                None => {
                    serde_json::json!({"type": ci::PLUGIN_TYPE, "admin_socket": agent::DEFAULT_ADMIN_SOCKET})
                }
                Some(p) => {
                    let text =
                        std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                    let v: serde_json::Value = serde_json::from_str(&text)
                        .map_err(|e| format!("{}: not JSON: {e}", p.display()))?;
                    if v.get("type").and_then(|t| t.as_str()) != Some(ci::PLUGIN_TYPE) {
                        return Err(format!(
                            "{}: the entry's type must be {:?}",
                            p.display(),
                            ci::PLUGIN_TYPE
                        ));
                    }
                    v
                }
            };
            if !no_binary {
                let me = std::env::current_exe().map_err(|e| e.to_string())?;
                let dst = ci::install_binary(&me, &bin_dir).map_err(|e| e.to_string())?;
                eprintln!("installed {}", dst.display());
            }
            if watch {
                ci::watch(
                    &conf_dir,
                    conflist.as_deref(),
                    &plugin,
                    std::time::Duration::from_secs(1),
                );
            }
            let done = ci::install_config(&conf_dir, conflist.as_deref(), &plugin)
                .map_err(|e| e.to_string())?;
            eprintln!("chained into {}", done.conflist.display());
            Ok(())
        })(),
        CniAction::Uninstall { conf_dir, bin_dir } => (|| -> Result<(), String> {
            for p in ci::uninstall_config(&conf_dir).map_err(|e| e.to_string())? {
                eprintln!("removed the plugin entry from {}", p.display());
            }
            let bin = bin_dir.join(ci::PLUGIN_TYPE);
            match std::fs::remove_file(&bin) {
                Ok(()) => eprintln!("removed {}", bin.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", bin.display())),
            }
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zmesh-redirect cni: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cni_plugin(command: &str) -> ExitCode {
    let mut stdin = String::new();
    if cni::reads_stdin(command) {
        if let Err(e) = std::io::stdin().read_to_string(&mut stdin) {
            eprintln!("zmesh-redirect (CNI): cannot read the network config on stdin: {e}");
        }
    }
    let outcome = cni::run(|k| std::env::var(k).ok(), &stdin, agent::request);
    if !outcome.stdout.is_empty() {
        println!("{}", outcome.stdout);
    }
    if !outcome.stderr.is_empty() {
        eprintln!("{}", outcome.stderr);
    }
    ExitCode::from(outcome.exit_code)
}

fn run_agent(args: AgentArgs) -> ExitCode {
    zmesh_redirect::logging::init_stderr();
    zmesh_redirect::logging::log_start("zmesh-redirect");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zmesh-redirect: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let kube = match args.enrollment.kube() {
        Ok(kube) => kube,
        Err(e) => {
            eprintln!("zmesh-redirect agent: invalid options: {e}");
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    let state_file = args
        .enrollment
        .state_file
        .unwrap_or_else(|| zmesh_redirect::state::default_path(&args.admin_socket));
    let config = AgentConfig {
        zds_socket: args.zds_socket,
        admin_socket: args.admin_socket,
        backend: args.backend.backend(),
        kube,
        state_file: Some(state_file),
        exclude_namespaces: args.enrollment.exclude_namespaces,
    };
    let result = runtime.block_on(async {
        // Registered before binding, so a signal that arrives during start-up is not lost.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        // Bound before the agent's sockets: /readyz answers "not ready" until they are.
        let health = health::Health::new();
        for (addr, role) in [
            (args.health_addr, health::Role::Probes),
            (args.metrics_addr, health::Role::Metrics),
        ] {
            if let health::EndpointAddr(Some(addr)) = addr {
                health::spawn(addr, role, health.clone()).await;
            }
        }
        agent::run_with(config, shutdown, |a| health.set_ready(a))
            .await
            .map_err(anyhow::Error::from)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Through the log, so a JSON pipeline reads the reason the agent stopped.
            tracing::error!(error = format!("{e:#}"), "zmesh-redirect agent stopped");
            ExitCode::FAILURE
        }
    }
}

fn pod(action: PodAction) -> ExitCode {
    let (socket, request) = match action {
        PodAction::Add {
            netns,
            uid,
            name,
            namespace,
            service_account,
            no_inbound_capture,
            dns_capture,
            admin_socket,
        } => (
            admin_socket,
            Request::Add(AddRequest {
                netns,
                uid,
                name,
                namespace,
                service_account,
                inbound_capture: !no_inbound_capture,
                dns_capture,
                by_labels: false,
            }),
        ),
        PodAction::Del { uid, admin_socket } => (admin_socket, Request::Del { uid }),
        PodAction::List { admin_socket } => (admin_socket, Request::List),
    };
    match agent::request(&socket, &request) {
        Ok(reply) if reply.ok => {
            println!("{}", serde_json::to_string(&reply).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(reply) => {
            let error = reply
                .error
                .as_deref()
                .unwrap_or("the agent refused without a reason");
            eprintln!("zmesh-redirect: {error}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("zmesh-redirect: {e}");
            ExitCode::FAILURE
        }
    }
}

fn host(action: Action) -> ExitCode {
    let args = match &action {
        Action::Install(a) | Action::Uninstall(a) | Action::Render(a) => a,
    };
    let options = args.options();
    // Validate up front so bad options get the config exit code, not a generic failure.
    let rules = match options.validate() {
        Ok(rules) => rules,
        Err(e) => {
            eprintln!("zmesh-redirect: invalid options: {e}");
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    let result = match action {
        Action::Install(_) => apply::install(&options, args.backend()),
        Action::Uninstall(_) => apply::uninstall(&options, args.backend()),
        Action::Render(_) => {
            print!("{}", rules.render(args.backend()));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zmesh-redirect: {e}");
            ExitCode::FAILURE
        }
    }
}
