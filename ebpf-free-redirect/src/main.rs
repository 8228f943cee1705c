//! `zmesh-redirect`: installs, removes or prints the capture rules. Parsing flags into
//! [`HostOptions`] is all it does; rule generation and application live in the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use zmesh_redirect::{apply, Backend, HostOptions, InboundPlaintext};

/// Invalid options, following the project-wide exit code for bad configuration (sysexits EX_USAGE).
const EXIT_INVALID_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "zmesh-redirect",
    version,
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

impl HostArgs {
    fn backend(&self) -> Backend {
        match self.backend {
            BackendArg::Iptables => Backend::Iptables,
            BackendArg::Nftables => Backend::Nftables,
        }
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
            ..HostOptions::default()
        }
    }
}

fn main() -> ExitCode {
    let Mode::Host { action } = Cli::parse().mode;
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
