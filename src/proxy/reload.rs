//! Live reconfiguration: the config file (and the certificate files it names) are watched, and
//! reloaded on SIGHUP too.
//!
//! A new file is parsed and validated completely before anything changes; when it is bad, the
//! error (file:line:column and field) is logged and counted and the last good config keeps
//! running. A good file replaces, in this order: the certificate source and trust snapshot
//! (roots, CRLs: live tunnels whose peer is now revoked are cut by their owners), the
//! certificates of departed identities (forgotten), and finally the model and policies in one
//! step, which makes every open inbound connection re-judge itself.
//!
//! Node settings (ports, mode, bind address...) belong to sockets that already exist; a change
//! to them is reported as needing a restart and otherwise ignored.
//!
//! Reading, parsing, validating and applying a file run on a thread of their own
//! ([`on_config_thread`]), never on the task that noticed the change: whatever runtime the watcher
//! is on (the control runtime in `zmesh-node`, the main thread in `zmesh-waypoint`), a slow or
//! hostile file cannot stall it or a data-plane worker (reliability #40).
//!
//! Watching polls file metadata (size, mtime, inode) rather than using inotify: it sees a
//! Kubernetes ConfigMap's symlink swap, editors' rename-over-write and network filesystems alike,
//! at the cost of one `stat` per file per interval.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use super::{Node, State};
use crate::config::{CertificatesConfig, Config, ConfigError};
use crate::identity::{CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE};

/// The name of the thread a reload parses and validates on (tests and stack dumps look for it).
pub const CONFIG_THREAD: &str = "zmesh-config";

/// Runs `work` (reading and validating a config file, applying it) on a new thread named
/// [`CONFIG_THREAD`] and waits for it without blocking the caller's runtime. A thread per reload
/// costs a few tens of microseconds, and reloads come at most once per watch interval or
/// SIGHUP; in exchange no runtime's thread is ever held by a parse. The thread enters the
/// caller's runtime, so the work may spawn tasks or use timers. Fails when no thread can be
/// started, or when the work panicked (the last good config then keeps running).
pub async fn on_config_thread<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Handle::try_current().ok();
    std::thread::Builder::new()
        .name(CONFIG_THREAD.into())
        .spawn(move || {
            let _entered = runtime.as_ref().map(|h| h.enter());
            let _ = tx.send(work());
        })?;
    rx.await
        .map_err(|_| std::io::Error::other("the config thread panicked"))
}

/// How often the watched files are checked. A policy edit takes effect within this, plus the
/// time connections need to re-judge themselves (microseconds each).
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("certificates: {0}")]
    Certs(String),
    #[error("{0} (restart the node to change it)")]
    NeedsRestart(&'static str),
}

/// What a reload changed, for the log line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub workloads: usize,
    pub services: usize,
    pub policies: usize,
    pub broken_policies: usize,
    /// Node settings that differ from the running ones and need a restart.
    pub needs_restart: Vec<&'static str>,
}

impl Node {
    /// Applies a validated config to the running node (see the module docs for what changes).
    pub fn reload(&self, cfg: Config) -> Result<ReloadSummary, ReloadError> {
        // Where the model comes from is fixed for the life of the process: a file reload must
        // never publish an empty model over an xDS-fed one, or start serving a file's model
        // while a stream still pushes.
        if self.cfg.node.control_plane.is_some() != cfg.node.control_plane.is_some() {
            return Err(ReloadError::NeedsRestart(
                "node.control_plane was added or removed",
            ));
        }
        let clock = self.certs.trust().clock().clone();
        // The node's own mark (none for an unprivileged `connect`, which could not set one).
        let (source, trust) = super::load_certificates_marked(&cfg, clock, self.mark())
            .map_err(|e| ReloadError::Certs(e.to_string()))?;
        self.certs
            .replace(source, trust)
            .map_err(|e| ReloadError::Certs(e.to_string()))?;
        if self.cfg.node.control_plane.is_some() {
            // Workloads, services and policies come from the control plane; the file only
            // names where certificates and trust come from.
            self.stats.reloads_applied.fetch_add(1, Ordering::Relaxed);
            return Ok(ReloadSummary {
                needs_restart: restart_only_changes(&self.cfg, &cfg),
                ..Default::default()
            });
        }
        let state = State::from_config(&cfg);
        let local: std::collections::HashSet<_> = state
            .model
            .local_workloads()
            .map(|w| w.identity.clone())
            .collect();
        self.certs.retain(&local);
        for id in &local {
            // A new workload gets its certificate now rather than on its first connection; a
            // failure here is retried by the renewal loop and on first use.
            if let Err(e) = self.certs.fetch(id) {
                tracing::warn!(identity = %id, error = %e, "no certificate yet for a new workload");
            }
        }
        let summary = ReloadSummary {
            workloads: cfg.workloads.len(),
            services: cfg.services.len(),
            policies: state.policies.len(),
            broken_policies: state.policies.errors().len(),
            needs_restart: restart_only_changes(&self.cfg, &cfg),
        };
        self.publish(state);
        self.stats.reloads_applied.fetch_add(1, Ordering::Relaxed);
        Ok(summary)
    }
}

impl Node {
    /// Replaces the model and policies in one step (a file reload or an xDS push): open
    /// connections re-judge themselves, metric series of departed workloads go, and
    /// certificates of departed local identities are forgotten while new ones are fetched in
    /// the background.
    pub fn publish(&self, state: State) {
        let model = state.model.clone();
        self.metrics.forget(&|name, ns| {
            name != "unknown"
                && !model
                    .workloads()
                    .iter()
                    .any(|w| w.name == name && w.namespace == ns)
        });
        self.state.send_replace(Arc::new(state));
    }
}

/// Node settings that differ between the running config and a new one, other than the ones a
/// reload applies (certificates and CRL).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.node, &new.node);
    let mut changed = Vec::new();
    let mut check = |name: &'static str, differs: bool| {
        if differs {
            changed.push(name);
        }
    };
    check("name", o.name != n.name);
    check("trust_domain", o.trust_domain != n.trust_domain);
    check("cluster", o.cluster != n.cluster);
    check("bind", o.bind != n.bind);
    check("ports", o.ports != n.ports);
    check(
        "inbound_plaintext",
        o.inbound_plaintext != n.inbound_plaintext,
    );
    check("registry_only", o.registry_only != n.registry_only);
    check("original_source", o.original_source != n.original_source);
    check(
        "east_west_gateway",
        o.east_west_gateway != n.east_west_gateway,
    );
    // `zmesh-node connect`'s listeners and allow-list are fixed at start.
    check("connect", old.connect != new.connect);
    check("access_log", o.access_log != n.access_log);
    check("worker_threads", o.worker_threads != n.worker_threads);
    check("mode", o.mode != n.mode);
    check("zds_socket", o.zds_socket != n.zds_socket);
    check("drain_timeout", o.drain_timeout != n.drain_timeout);
    check(
        "handshake_timeout",
        o.handshake_timeout != n.handshake_timeout,
    );
    check("connect_timeout", o.connect_timeout != n.connect_timeout);
    check("ping_interval", o.ping_interval != n.ping_interval);
    check("ping_timeout", o.ping_timeout != n.ping_timeout);
    check("control_plane", o.control_plane != n.control_plane);
    changed
}

/// Every file whose change should trigger a reload: the config and the certificate material
/// it names.
pub fn watched_files(config: &Path, cfg: &Config) -> Vec<PathBuf> {
    let mut files = vec![config.to_path_buf()];
    match &cfg.node.certificates {
        CertificatesConfig::FileCa { dir, .. } => {
            for f in [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE] {
                files.push(dir.join(f));
            }
        }
        CertificatesConfig::Static { roots, identities } => {
            files.push(roots.clone());
            for i in identities {
                files.push(i.cert.clone());
                files.push(i.key.clone());
            }
        }
        // The CA's root: a rotated mesh root is picked up like a rotated file CA.
        CertificatesConfig::CaClient { target, .. } => files.push(target.root_cert.clone()),
        CertificatesConfig::CaClientUnresolved(_) => {}
    }
    files.extend(cfg.node.crl.clone());
    files
}

/// What identifies one version of a file without reading it. A missing file is a version too
/// (`None`), so deleting and restoring it are both seen.
pub type Stamp = Option<(u64, SystemTime, u64)>;

pub fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    // `metadata` follows symlinks: a ConfigMap's `..data` swap changes the target's inode.
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?, m.ino()))
}

pub fn stamps(files: &[PathBuf]) -> Vec<Stamp> {
    files.iter().map(|f| stamp(f)).collect()
}

/// Loads `path` and applies it, logging the outcome. Returns the config that is now running
/// (the new one, or None when it was rejected).
pub fn reload_from(node: &Node, path: &Path) -> Option<Config> {
    let outcome = Config::load_effective(path)
        .map_err(ReloadError::from)
        .and_then(|cfg| node.reload(cfg.clone()).map(|s| (cfg, s)));
    match outcome {
        Ok((cfg, s)) => {
            if !s.needs_restart.is_empty() {
                tracing::warn!(settings = ?s.needs_restart, "node settings changed in {}; they take effect at the next restart", path.display());
            }
            tracing::info!(
                workloads = s.workloads,
                services = s.services,
                policies = s.policies,
                broken_policies = s.broken_policies,
                "config reloaded from {}",
                path.display()
            );
            Some(cfg)
        }
        Err(e) => {
            node.stats.reloads_rejected.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "config reload rejected; the last good config keeps running");
            None
        }
    }
}

/// Watches `path` (and the files it names) every `interval`, and reloads at once when
/// `trigger` is notified (SIGHUP). `loaded` is the config file's [`stamp`] taken before the
/// running config was read from it, so an edit made while the node was starting is not missed.
/// Runs until dropped.
pub async fn watch(
    node: Arc<Node>,
    path: PathBuf,
    loaded: Stamp,
    interval: Duration,
    trigger: Arc<Notify>,
) {
    let cfg = node.cfg.clone();
    let n = node.clone();
    watch_files(
        path,
        &cfg,
        loaded,
        interval,
        trigger,
        move |p| reload_from(&n, p),
        move || {
            node.stats.reloads_rejected.fetch_add(1, Ordering::Relaxed);
        },
    )
    .await
}

/// The watcher both binaries use: checks `path` and the certificate files `cfg` names every
/// `interval` (at once when `trigger` is notified), and for each change runs `reload` on the
/// config thread. The config file counts as changed when it differs from `loaded`, its stamp
/// taken before `cfg` was read: the file may have been edited between that read and this
/// watcher's start (a node waits for certificates and its first sync in between). `reload` logs its own outcome and returns the config it applied, whose files
/// are watched from then on, or `None` when it refused the file. `rejected` counts a reload
/// that could not run at all (no thread, or a panic). Runs until dropped.
pub async fn watch_files<R>(
    path: PathBuf,
    cfg: &Config,
    loaded: Stamp,
    interval: Duration,
    trigger: Arc<Notify>,
    reload: R,
    rejected: impl Fn(),
) where
    R: Fn(&Path) -> Option<Config> + Clone + Send + 'static,
{
    let mut files = watched_files(&path, cfg);
    let mut seen = stamps(&files);
    // The config file is always first.
    seen[0] = loaded;
    loop {
        let forced = tokio::select! {
            _ = tokio::time::sleep(interval) => false,
            _ = trigger.notified() => true,
        };
        let now = stamps(&files);
        if !forced && now == seen {
            continue;
        }
        seen = now;
        let (r, p) = (reload.clone(), path.clone());
        let outcome = on_config_thread(move || r(&p)).await.unwrap_or_else(|e| {
            rejected();
            tracing::error!(error = %e, "config reload rejected; the last good config keeps running");
            None
        });
        if let Some(cfg) = outcome {
            // The new config may name other certificate files.
            files = watched_files(&path, &cfg);
            seen = stamps(&files);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra_node: &str) -> Config {
        Config::parse(
            &format!(
                "node:\n  name: n\n{extra_node}  certificates:\n    static:\n      roots: /r.pem\n      identities: [{{cert: /c.pem, key: /k.pem}}]\n"
            ),
            "t",
        )
        .unwrap()
    }

    #[test]
    fn node_settings_that_need_a_restart_are_named() {
        let old = cfg("");
        assert!(restart_only_changes(&old, &cfg("")).is_empty());
        let new = cfg("  ports: { hbone: 16008 }\n  access_log: json\n");
        assert_eq!(
            restart_only_changes(&old, &new),
            vec!["ports", "access_log"]
        );
        // The HBONE dial deadline: 10 s unless set; pools keep the value they started with.
        assert_eq!(old.node.connect_timeout, Duration::from_secs(10));
        let dial = cfg("  connect_timeout: 3s\n");
        assert_eq!(dial.node.connect_timeout, Duration::from_secs(3));
        assert_eq!(restart_only_changes(&old, &dial), vec!["connect_timeout"]);
        // Certificates and the CRL are applied by the reload, so they are not listed.
        let crl = cfg("  crl: /crl.pem\n");
        assert!(restart_only_changes(&old, &crl).is_empty());
    }

    #[test]
    fn watched_files_include_certificate_material() {
        let c = cfg("  crl: /crl.pem\n");
        let files = watched_files(Path::new("/etc/zmesh.yaml"), &c);
        let names: Vec<_> = files.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            names,
            ["/etc/zmesh.yaml", "/r.pem", "/c.pem", "/k.pem", "/crl.pem"]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn reload_work_runs_on_the_config_thread_not_a_runtime_worker() {
        let here = std::thread::current().name().map(str::to_string);
        let (name, in_runtime) = on_config_thread(|| {
            (
                std::thread::current().name().map(str::to_string),
                tokio::runtime::Handle::try_current().is_ok(),
            )
        })
        .await
        .unwrap();
        assert_eq!(name.as_deref(), Some(CONFIG_THREAD));
        assert_ne!(here, name);
        assert!(
            in_runtime,
            "the work can spawn tasks on the caller's runtime"
        );
        // A panicking parse is an error for the caller, not a dead watcher.
        let e = on_config_thread(|| -> u8 { panic!("boom") })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("panicked"), "{e}");
    }

    #[test]
    fn a_stamp_changes_with_content_and_sees_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        assert_eq!(stamp(&f), None);
        std::fs::write(&f, "a").unwrap();
        let first = stamp(&f);
        assert!(first.is_some());
        // Rename-over-write (what editors and ConfigMaps do) gives a new inode.
        let tmp = dir.path().join("x.tmp");
        std::fs::write(&tmp, "b").unwrap();
        std::fs::rename(&tmp, &f).unwrap();
        assert_ne!(stamp(&f), first);
    }

    /// The file is edited after it was read but before the watcher takes its first look (a node
    /// waits for certificates and its first sync in between): the edit is still reloaded.
    #[tokio::test]
    async fn an_edit_made_while_starting_is_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.yaml");
        std::fs::write(&path, "a").unwrap();
        let loaded = stamp(&path);
        let tmp = dir.path().join("tmp");
        std::fs::write(&tmp, "ab").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let c = cfg("");
        let watcher = watch_files(
            path.clone(),
            &c,
            loaded,
            Duration::from_millis(10),
            Arc::new(Notify::new()),
            move |p: &Path| {
                let _ = tx.send(p.to_path_buf());
                None
            },
            || {},
        );
        tokio::select! {
            () = watcher => unreachable!("the watcher runs until dropped"),
            seen = rx.recv() => assert_eq!(seen.as_deref(), Some(path.as_path())),
            () = tokio::time::sleep(Duration::from_secs(10)) => panic!("the edit was never reloaded"),
        }
    }

    /// An untouched file is not reloaded, however many times the watcher looks.
    #[tokio::test]
    async fn an_untouched_file_is_not_reloaded() {
        use std::sync::atomic::AtomicUsize;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.yaml");
        std::fs::write(&path, "a").unwrap();
        let loaded = stamp(&path);
        let reloads = Arc::new(AtomicUsize::new(0));
        let r = reloads.clone();
        let c = cfg("");
        let watcher = watch_files(
            path,
            &c,
            loaded,
            Duration::from_millis(5),
            Arc::new(Notify::new()),
            move |_: &Path| {
                r.fetch_add(1, Ordering::SeqCst);
                None
            },
            || {},
        );
        // About 40 looks.
        let looked = tokio::time::timeout(Duration::from_millis(200), watcher).await;
        assert!(looked.is_err(), "the watcher runs until dropped");
        assert_eq!(reloads.load(Ordering::SeqCst), 0);
    }
}
