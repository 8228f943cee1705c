//! zmesh-waypoint: the L7 proxy. It takes HBONE in, applies HTTP routing and policy, and sends
//! each request on over HBONE under its own identity (docs/waypoint.md).
//!
//! `zmesh-waypoint run --config FILE` serves; `check-config FILE` validates (exit 64 when
//! invalid). The config is the mesh model file plus a `waypoint: {workload: <uid>}` section;
//! it is re-read when it changes and on SIGHUP (a bad file keeps the last good one running).

zmesh::binary_allocator!();

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use zmesh::config::Config;
use zmesh::identity::CertManager;
use zmesh::proxy::load_certificates;
use zmesh::waypoint::server::{self, Waypoint};

/// Exit code for an invalid config: sysexits.h EX_USAGE, as for zmesh-node.
const EXIT_INVALID_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "zmesh-waypoint",
    version = zmesh_redirect::VERSION,
    about = "zmesh waypoint (L7 proxy over HBONE)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the waypoint.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit (64 when invalid).
    CheckConfig { file: PathBuf },
}

fn main() -> ExitCode {
    declare_allocator();
    match Cli::parse().cmd {
        Cmd::CheckConfig { file } => match load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_INVALID_CONFIG)
            }
        },
        Cmd::Run { config } => {
            // Logging first, so even a refused config is a line the log pipeline can read.
            zmesh_redirect::logging::init_stderr();
            zmesh_redirect::logging::log_start("zmesh-waypoint");
            // Taken before the read: an edit during start-up is then seen by the watcher.
            let loaded = zmesh::proxy::reload::stamp(&config);
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "invalid config; not starting");
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            };
            match run(cfg, config, loaded) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "zmesh-waypoint stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Loads and validates, including the waypoint-only checks (its workload exists, JWKS parse).
fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    let cfg = Config::load(path)?;
    anyhow::ensure!(
        cfg.waypoint.is_some(),
        "{}: a waypoint config needs `waypoint: {{workload: <uid>}}`",
        path.display()
    );
    server::WpState::from_config(&cfg).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(cfg)
}

fn run(cfg: Config, path: PathBuf, loaded: zmesh::proxy::reload::Stamp) -> anyhow::Result<()> {
    let workers = zmesh::workers::detect(cfg.node.worker_threads).count;
    // Workers give their allocator caches back after a load; the one runtime nudges itself.
    let rt = zmesh::alloc::trimming_runtime("zmesh-waypoint", workers, None)
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        let (source, trust) = load_certificates(&cfg, Arc::new(zmesh::identity::SystemClock))?;
        let certs = Arc::new(CertManager::with_trust(source, trust)?);
        tokio::spawn(certs.clone().run_renewals());
        let wp = Waypoint::new(cfg, certs)?;
        let (hbone, admin) = server::start(wp.clone()).await?;
        tracing::info!(%hbone, %admin, "zmesh waypoint ready");
        watch_config(wp, path, loaded).await
    })
}

/// SIGTERM: GOAWAY on every HBONE connection, then wait for them up to `node.drain_timeout`.
async fn drain(wp: &Waypoint) -> anyhow::Result<()> {
    tracing::info!(deadline = ?wp.cfg.node.drain_timeout, "draining");
    let left = wp.drain(wp.cfg.node.drain_timeout).await;
    tracing::info!(still_open = left, "drain finished");
    Ok(())
}

/// Re-reads the config (and the certificate files it names: a CRL update reaches the
/// waypoint's live connections as it does a node's) when it changes, checked each second, or
/// on SIGHUP, with the node's watcher; drains on SIGTERM or ^C.
async fn watch_config(
    wp: Arc<Waypoint>,
    path: PathBuf,
    loaded: zmesh::proxy::reload::Stamp,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let trigger = Arc::new(tokio::sync::Notify::new());
    let w = wp.clone();
    // Parsing and validating (JWKS, regexes, the model) run on the config thread, never on
    // this runtime (reliability #40).
    let reload = move |p: &std::path::Path| match load(p)
        .and_then(|cfg| w.reload(&cfg).map(|()| cfg).map_err(Into::into))
    {
        Ok(cfg) => {
            tracing::info!("config reloaded from {}", p.display());
            Some(cfg)
        }
        Err(e) => {
            tracing::error!(error = %e, "config reload rejected; the last good config keeps running");
            None
        }
    };
    let watcher = zmesh::proxy::reload::watch_files(
        path,
        &wp.cfg,
        loaded,
        zmesh::proxy::reload::WATCH_INTERVAL,
        trigger.clone(),
        reload,
        || {},
    );
    tokio::pin!(watcher);
    loop {
        tokio::select! {
            // The watcher runs until dropped; were it to end, so would the waypoint.
            () = &mut watcher => return Ok(()),
            _ = hup.recv() => trigger.notify_one(),
            _ = term.recv() => return drain(&wp).await,
            _ = tokio::signal::ctrl_c() => return drain(&wp).await,
        }
    }
}
