//! zmesh-node: the per-node L4 tunnel.
//!
//! `zmesh-node run [--config FILE]` serves; `check-config FILE` validates (exit 64 when invalid);
//! `ca init` creates a dev CA for the built-in file CA mode.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use zmesh::config::{AccessLogFormat, Config, EMBEDDED_DEFAULT};
use zmesh::identity::FileCa;

/// Exit code for an invalid config: sysexits.h EX_USAGE, as the project's conventions require.
const EXIT_INVALID_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "zmesh-node", version, about = "zmesh node tunnel (HBONE)")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
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
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a self-signed dev CA for the built-in file CA.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = zmesh::config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd.unwrap_or(Cmd::Run { config: None }) {
        Cmd::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
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
        Cmd::Run { config } => {
            let cfg = match &config {
                Some(path) => Config::load(path),
                None => Config::parse(EMBEDDED_DEFAULT, "<embedded default>"),
            };
            let cfg = match cfg {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            };
            match run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("zmesh-node: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(format: AccessLogFormat) {
    let filter = EnvFilter::try_from_env("ZMESH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if format == AccessLogFormat::Json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
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

fn run(cfg: Config) -> anyhow::Result<()> {
    init_logging(cfg.node.access_log);
    raise_nofile_limit();
    let workers = match cfg.node.worker_threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("zmesh-data")
        .enable_all()
        .build()
        .context("cannot start the data-plane runtime")?;
    rt.block_on(async move {
        tracing::info!(config = ?cfg, "effective config");
        let drain_timeout = cfg.node.drain_timeout;
        let node = zmesh::proxy::Node::new(cfg)?;
        let running = zmesh::proxy::start(node.clone()).await?;
        let mut signals = Signals::new();
        signals.next().await;
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
    })
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
