//! The node agent: the long-running half of in-pod capture. It owns the [`ZdsServer`] that node
//! tunnels connect to, and an admin socket through which pods are enrolled (by the CNI plugin in
//! [`crate::cni`], or by `zmesh-redirect pod add` for operators and tests). Enrolling a pod means,
//! in this order: install the in-pod rules inside its netns, then hand the netns to the newest
//! ready tunnel (one that acked its snapshot; see [`crate::zds::server`]) and wait for its ack.
//! The admin reply is sent only after both, so a CNI ADD (and with it the pod's start) blocks
//! until the pod is captured AND served. The netns path is opened without blocking and checked
//! to be a network namespace first ([`crate::nsfd`]): a FIFO there fails the request at once.
//!
//! When no tunnel is ready the pod is still captured and cached; it is replayed to the next
//! tunnel that connects, and the reply says `"tunnel":"pending"`. Meanwhile its connections fail:
//! a pod is never left uncaptured because its proxy is missing.
//!
//! The admin protocol is one JSON object per line each way, over a unix STREAM socket of mode 0600
//! (only root may enroll pods, since enrolling hands a netns to whoever listens on ZDS):
//! `{"op":"add","netns":PATH,"uid":..,"name":..,"namespace":..,"service_account":..,
//! "inbound_capture":true,"dns_capture":false,"by_labels":false}`, `{"op":"del","uid":..}`,
//! `{"op":"check","uid":..,"name":..,"namespace":..}`, `{"op":"list"}`; the reply is
//! `{"ok":true,..}` (with `"enrolled":true|false` for add and check) or
//! `{"ok":false,"error":".."}`.
//!
//! With the Kubernetes API configured ([`crate::k8s`]), pods are enrolled by label
//! ([`crate::enroll`]): a CNI ADD asks with `"by_labels":true` and a pod that is not meshed is
//! answered `"enrolled":false` without capture; a running pod that becomes meshed is found by its
//! UID and IP ([`crate::netns_scan`]) and enrolled live, and one that stops being meshed is released
//! (rules removed, ZDS `del`). Without the API every pod the CNI hands over is enrolled.
//!
//! Restarts: the enrolled set is written to a state file ([`crate::state`]) after every change.
//! A starting agent re-captures those pods (installing rules is idempotent) and, with the API,
//! the meshed pods of its node, all behind the ZDS gate: a tunnel gets its snapshot only once the
//! set is whole, so it never stops the proxy of a pod that is still meshed.
//!
//! Rules are installed from a dedicated `std::thread` that `setns`'s into the pod netns and then
//! exits. Never from tokio's blocking pool: its threads are reused, and one left inside a pod netns
//! would run some later, unrelated work there.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::future::Future;
use std::io::{self, BufRead as _, BufReader, Write as _};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinSet;

use crate::apply::{install_pod, uninstall_pod, ApplyError};
use crate::enroll::PodFacts;
use crate::k8s::{Confirmed, K8s, K8sError, KubeSettings};
use crate::netns_scan::{self, ScanError};
use crate::nsfd::{open_netns, OpenNetnsError};
use crate::rules::{Backend, PodOptions};
use crate::state::{PodRecord, StateFile};
use crate::zds::{Delivery, WorkloadInfo, ZdsError, ZdsServer};

/// Where the agent listens for enrollment requests unless told otherwise; the CNI plugin and
/// `pod add` default to the same path.
pub const DEFAULT_ADMIN_SOCKET: &str = "/var/run/zmesh/redirect.sock";

/// How long a client waits for the agent's reply. An add runs up to six iptables commands (each
/// may wait 10 s for the xtables lock) and then waits up to `ACK_TIMEOUT` (5 s) for the tunnel;
/// a minute covers that with room, and stays well under kubelet's CNI timeout.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest request line accepted. Real requests are a few hundred bytes (Kubernetes names are at
/// most 253 characters); the bound only stops a confused client from growing our buffer forever.
const MAX_REQUEST_LINE: u64 = 64 * 1024;

/// Pending admin connections the kernel queues; CNI ADDs arrive a few at a time.
const ADMIN_BACKLOG: i32 = 64;

/// One admin request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Capture the pod in `netns` and hand it to the tunnel.
    Add(AddRequest),
    /// The pod is gone: tell the tunnels, and remove the rules if its netns still exists.
    Del { uid: String },
    /// Is the pod where it should be: enrolled, or (by its labels) not meshed? What CNI CHECK asks.
    Check {
        uid: String,
        #[serde(default)]
        name: String,
        #[serde(default)]
        namespace: String,
    },
    /// The enrolled (cached) pod uids and the number of connected tunnels that acked their
    /// snapshot (the ones that get new pods).
    List,
}

/// The pod to enroll and its per-pod capture opt-outs (docs/capture.md, "Per-pod opt-outs").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddRequest {
    /// Path of the pod's network namespace (a bind mount such as `/var/run/netns/cni-…`).
    pub netns: PathBuf,
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// False is the inbound capture bypass; default true.
    #[serde(default = "default_true")]
    pub inbound_capture: bool,
    /// Redirect the pod's DNS to the tunnel's DNS proxy; default false.
    #[serde(default)]
    pub dns_capture: bool,
    /// Let the agent decide from the pod's labels (Kubernetes API) whether to capture it at all;
    /// the CNI plugin sets it. Default false: an explicit enrollment (`pod add`). Without the API
    /// configured, every pod is enrolled either way.
    #[serde(default)]
    pub by_labels: bool,
}

fn default_true() -> bool {
    true
}

/// Whether the tunnel has the pod yet, in an `add` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelStatus {
    /// The newest ready tunnel acked the pod.
    Acked,
    /// No tunnel had completed its snapshot: the pod is captured and cached, and replayed to the
    /// next tunnel (or sent to one still in its snapshot once that is acked).
    Pending,
}

/// The agent's answer to one request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnels: Option<usize>,
    /// For add and check: whether the pod is captured (false: not meshed by its labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled: Option<bool>,
    /// Why a pod is or is not meshed, when the labels decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Reply {
    pub fn ok() -> Self {
        Reply {
            ok: true,
            ..Reply::default()
        }
    }

    pub fn error(error: impl ToString) -> Self {
        Reply {
            ok: false,
            error: Some(error.to_string()),
            ..Reply::default()
        }
    }
}

/// What can go wrong in the agent; each message names the pod, the netns and the failing step.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("pod {uid}: cannot open netns {path}: {source} (is the pod sandbox still running?)")]
    OpenNetns {
        uid: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("pod {uid}: netns {path} refused: {source}")]
    BadNetns {
        uid: String,
        path: PathBuf,
        source: OpenNetnsError,
    },
    #[error("pod {uid}: cannot start a thread to enter netns {path}: {source}")]
    Thread {
        uid: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("pod {uid}: cannot enter netns {path} (setns): {source} (is it a network namespace, and does the agent run as root?)")]
    EnterNetns {
        uid: String,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("pod {uid}: the thread applying rules in netns {path} panicked")]
    ThreadPanicked { uid: String, path: PathBuf },
    #[error("pod {uid}: installing the capture rules in netns {path} failed: {source}")]
    Install {
        uid: String,
        path: PathBuf,
        source: ApplyError,
    },
    #[error("pod {uid}: removing the capture rules from netns {path} failed: {source}")]
    Uninstall {
        uid: String,
        path: PathBuf,
        source: ApplyError,
    },
    #[error("pod {uid}: capture rules are installed in netns {path}, but the hand-off to the node tunnel failed: {source}")]
    Handoff {
        uid: String,
        path: PathBuf,
        source: ZdsError,
    },
    #[error("pod {uid}: telling the node tunnels about the deletion failed: {source}")]
    Delete { uid: String, source: ZdsError },
    #[error(transparent)]
    Zds(#[from] ZdsError),
    #[error("cannot start enrollment from the Kubernetes API: {source}")]
    KubeStart { source: K8sError },
    #[error(
        "pod {uid}: cannot tell whether it is meshed, so it is not started uncaptured: {source}"
    )]
    Kube { uid: String, source: K8sError },
    #[error("pod {uid}: is meshed but not enrolled with the redirect agent: its traffic is not handed to the node tunnel; recreate the pod")]
    NotEnrolled { uid: String },
    #[error("pod {namespace}/{name} ({uid}): finding its netns failed: {source}")]
    Scan {
        uid: String,
        namespace: String,
        name: String,
        source: ScanError,
    },
    #[error("pod {namespace}/{name} ({uid}): no network namespace on this node holds its IPs {ips:?} among its processes' (cgroup pod{uid}; not started yet, or its sandbox is gone)")]
    NoNetns {
        uid: String,
        namespace: String,
        name: String,
        ips: Vec<std::net::IpAddr>,
    },
    #[error(
        "cannot listen on admin socket {path}: {source} (is the directory writable by the agent?)"
    )]
    AdminBind { path: PathBuf, source: io::Error },
    #[error(
        "refusing to replace {path}: it exists and is not a unix socket (check --admin-socket)"
    )]
    NotASocket { path: PathBuf },
}

/// A pod this agent installed rules for, remembered to remove them on `del`.
struct Enrolled {
    netns: PathBuf,
    /// (st_dev, st_ino) of the netns when enrolled: a netns path reused by a later pod must not
    /// lose that pod's rules when the old pod is deleted.
    id: (u64, u64),
    options: PodOptions,
    info: WorkloadInfo,
}

/// The enrollment logic, independent of the admin socket that feeds it.
pub struct Agent {
    zds: ZdsServer,
    backend: Backend,
    enrolled: Mutex<HashMap<String, Enrolled>>,
    /// One lock per uid being enrolled or released right now: a CNI ADD waits for the
    /// reconciler's work on the same pod (and the other way round, the reconciler skips it), so
    /// two enrollments of one pod never race to record different netns.
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    k8s: Option<K8s>,
    state: Option<StateFile>,
    /// Held from the snapshot of `enrolled` to the state file's rename: two writers would share
    /// the temporary file, and an older snapshot could land last.
    persisting: Mutex<()>,
    /// Namespaces whose pods are never enrolled by label, whatever their labels say (the CNI
    /// plugin's own list excludes them on ADD; this keeps live enrollment consistent with it).
    excluded_namespaces: Vec<String>,
    counters: crate::health::Counters,
}

/// A claim on one uid, held for as long as it lives; the last claim out removes the entry.
struct InFlight<'a> {
    map: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    uid: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = lock(self.map);
        // Only the map's own reference left: nobody holds or waits for this uid.
        if map
            .get(&self.uid)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.uid);
        }
    }
}

impl Agent {
    pub fn new(zds: ZdsServer, backend: Backend) -> Self {
        Self::with(zds, backend, None, None)
    }

    /// An agent that enrolls by label through `k8s` (if any) and records its pods in `state`.
    pub fn with(
        zds: ZdsServer,
        backend: Backend,
        k8s: Option<K8s>,
        state: Option<StateFile>,
    ) -> Self {
        Self {
            zds,
            backend,
            enrolled: Mutex::new(HashMap::new()),
            persisting: Mutex::new(()),
            in_flight: Mutex::new(HashMap::new()),
            k8s,
            state,
            excluded_namespaces: crate::cni::DEFAULT_EXCLUDED_NAMESPACES
                .iter()
                .map(|n| n.to_string())
                .collect(),
            counters: Default::default(),
        }
    }

    /// Replaces the namespaces never enrolled by label (default: the CNI plugin's default).
    pub fn exclude_namespaces(mut self, namespaces: Vec<String>) -> Self {
        self.excluded_namespaces = namespaces;
        self
    }

    fn excluded(&self, namespace: &str) -> bool {
        self.excluded_namespaces.iter().any(|n| n == namespace)
    }

    fn uid_lock(&self, uid: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.in_flight)
            .entry(uid.to_owned())
            .or_default()
            .clone()
    }

    /// Claims `uid`, waiting for whoever holds it (a CNI ADD waits for the reconciler).
    async fn claim(&self, uid: &str) -> InFlight<'_> {
        let guard = self.uid_lock(uid).lock_owned().await;
        InFlight {
            map: &self.in_flight,
            uid: uid.to_owned(),
            guard: Some(guard),
        }
    }

    /// Claims `uid` only if nobody holds it (the reconciler leaves a pod in flight alone).
    fn try_claim(&self, uid: &str) -> Option<InFlight<'_>> {
        let guard = self.uid_lock(uid).try_lock_owned().ok();
        // Built either way, so a failed try also drops its reference through `Drop`.
        let claim = InFlight {
            map: &self.in_flight,
            uid: uid.to_owned(),
            guard,
        };
        claim.guard.is_some().then_some(claim)
    }

    fn is_enrolled(&self, uid: &str) -> bool {
        lock(&self.enrolled).contains_key(uid)
    }

    /// Writes the enrolled set to the state file; a failure is logged, not fatal (the pods are
    /// captured either way; only a restart would forget them).
    fn persist(&self) {
        let Some(state) = &self.state else { return };
        let _one_writer = lock(&self.persisting);
        let records: Vec<PodRecord> = lock(&self.enrolled)
            .iter()
            .map(|(uid, e)| PodRecord {
                uid: uid.clone(),
                netns: e.netns.clone(),
                netns_id: e.id,
                name: e.info.name.clone(),
                namespace: e.info.namespace.clone(),
                service_account: e.info.service_account.clone(),
                inbound_capture: e.options.inbound_capture,
                dns_capture: e.options.dns_capture,
            })
            .collect();
        if let Err(e) = state.save(&records) {
            tracing::error!(error = %e, "cannot record the enrolled pods");
        }
    }

    /// Requests served by kind and result, pods enrolled, tunnels connected (`health`).
    pub fn counters(&self) -> &crate::health::Counters {
        &self.counters
    }
    pub fn enrolled_pods(&self) -> usize {
        lock(&self.enrolled).len()
    }
    pub fn connected_tunnels(&self) -> usize {
        self.zds.connected_tunnels()
    }

    /// Serves one request; failures become `{"ok":false,"error":..}`.
    pub async fn handle(&self, request: Request) -> Reply {
        let op = crate::health::Op::of(&request);
        let reply = match request {
            Request::Add(add) => match self.add_by_request(add).await {
                Ok(reply) => reply,
                Err(e) => Reply::error(e),
            },
            Request::Check {
                uid,
                name,
                namespace,
            } => match self.check(&uid, &namespace, &name).await {
                Ok(reply) => reply,
                Err(e) => Reply::error(e),
            },
            Request::Del { uid } => match self.del(&uid).await {
                Ok(()) => Reply::ok(),
                Err(e) => Reply::error(e),
            },
            Request::List => Reply {
                uids: Some(self.zds.cached_pods()),
                tunnels: Some(self.zds.connected_tunnels()),
                ..Reply::ok()
            },
        };
        self.counters.record(op, reply.ok);
        reply
    }

    /// An `add` from the admin socket: with `by_labels` and the API configured, the labels decide
    /// first (and the pod's service account comes from its spec).
    async fn add_by_request(&self, mut req: AddRequest) -> Result<Reply, AgentError> {
        let _claim = self.claim(&req.uid).await;
        let mut reason = None;
        if req.by_labels && self.k8s.is_some() && self.excluded(&req.namespace) {
            return Ok(Reply {
                enrolled: Some(false),
                reason: Some(format!(
                    "not meshed: namespace {} is excluded",
                    req.namespace
                )),
                ..Reply::ok()
            });
        }
        if let (true, Some(k8s)) = (req.by_labels, &self.k8s) {
            let (decision, facts) = k8s
                .decide_add(&req.namespace, &req.name, &req.uid)
                .await
                .map_err(|source| AgentError::Kube {
                    uid: req.uid.clone(),
                    source,
                })?;
            tracing::info!(uid = %req.uid, pod = %format!("{}/{}", req.namespace, req.name), %decision, "CNI ADD");
            if !decision.is_meshed() {
                return Ok(Reply {
                    enrolled: Some(false),
                    reason: Some(decision.to_string()),
                    ..Reply::ok()
                });
            }
            req.service_account = facts.service_account;
            reason = Some(decision.to_string());
        }
        let status = self.add(req).await?;
        Ok(Reply {
            tunnel: Some(status),
            enrolled: Some(true),
            reason,
            ..Reply::ok()
        })
    }

    /// CNI CHECK: enrolled is fine; not enrolled is fine only when the labels say not meshed.
    async fn check(&self, uid: &str, namespace: &str, name: &str) -> Result<Reply, AgentError> {
        if self.is_enrolled(uid) {
            return Ok(Reply {
                enrolled: Some(true),
                ..Reply::ok()
            });
        }
        let not_enrolled = || AgentError::NotEnrolled {
            uid: uid.to_owned(),
        };
        let Some(k8s) = &self.k8s else {
            return Err(not_enrolled());
        };
        let (decision, _) = k8s
            .decide_add(namespace, name, uid)
            .await
            .map_err(|source| AgentError::Kube {
                uid: uid.to_owned(),
                source,
            })?;
        if decision.is_meshed() {
            return Err(not_enrolled());
        }
        Ok(Reply {
            enrolled: Some(false),
            reason: Some(decision.to_string()),
            ..Reply::ok()
        })
    }

    /// Captures first, then hands off: a pod the tunnel serves is always a captured one.
    pub async fn add(&self, req: AddRequest) -> Result<TunnelStatus, AgentError> {
        for (field, value) in [
            ("uid", req.uid.as_str()),
            ("name", &req.name),
            ("namespace", &req.namespace),
            ("service_account", &req.service_account),
        ] {
            if value.is_empty() {
                return Err(AgentError::InvalidRequest(format!(
                    "add: `{field}` is empty (netns {})",
                    req.netns.display()
                )));
            }
        }
        let uid = req.uid.clone();
        let path = req.netns.clone();
        // Never a plain open: a FIFO at this path would block this worker until a writer comes.
        let netns = open_netns(&path).map_err(|source| AgentError::BadNetns {
            uid: uid.clone(),
            path: path.clone(),
            source,
        })?;
        let options = PodOptions {
            inbound_capture: req.inbound_capture,
            dns_capture: req.dns_capture,
            ..PodOptions::default()
        };
        let info = WorkloadInfo {
            name: req.name,
            namespace: req.namespace,
            service_account: req.service_account,
        };
        self.enroll(uid, path, netns, info, options).await
    }

    /// Installs the rules in `netns` (reached as `path`), records the pod, hands it off.
    async fn enroll(
        &self,
        uid: String,
        path: PathBuf,
        netns: File,
        info: WorkloadInfo,
        options: PodOptions,
    ) -> Result<TunnelStatus, AgentError> {
        let meta = netns.metadata().map_err(|source| AgentError::OpenNetns {
            uid: uid.clone(),
            path: path.clone(),
            source,
        })?;
        let backend = self.backend;
        let install_options = options.clone();
        in_netns(&netns, &uid, &path, move || {
            install_pod(&install_options, backend)
        })
        .await?
        .map_err(|source| AgentError::Install {
            uid: uid.clone(),
            path: path.clone(),
            source,
        })?;
        tracing::info!(%uid, netns = %path.display(), "capture rules installed");
        lock(&self.enrolled).insert(
            uid.clone(),
            Enrolled {
                netns: path.clone(),
                id: (meta.dev(), meta.ino()),
                options,
                info: info.clone(),
            },
        );
        self.persist();

        let status = match self
            .zds
            .add_pod(uid.clone(), info, OwnedFd::from(netns))
            .await
            .map_err(|source| AgentError::Handoff {
                uid: uid.clone(),
                path: path.clone(),
                source,
            })? {
            Delivery::Acked => TunnelStatus::Acked,
            Delivery::Cached => TunnelStatus::Pending,
        };
        match status {
            TunnelStatus::Acked => tracing::info!(%uid, "pod handed to the node tunnel"),
            // Behind the gate (a restart's rebuild) that is the plan, not a problem.
            TunnelStatus::Pending if !self.zds.gate_open() => {
                tracing::info!(%uid, "pod cached for the first snapshot")
            }
            TunnelStatus::Pending => {
                tracing::warn!(%uid, "no node tunnel connected; pod cached until one connects")
            }
        }
        Ok(status)
    }

    /// Tells every tunnel, then removes the rules if the pod's netns still exists (usually it is
    /// already gone, which is not an error). Both steps run even if the first fails.
    pub async fn del(&self, uid: &str) -> Result<(), AgentError> {
        if uid.is_empty() {
            return Err(AgentError::InvalidRequest("del: `uid` is empty".into()));
        }
        let tunnels = self
            .zds
            .del_pod(uid)
            .await
            .map_err(|source| AgentError::Delete {
                uid: uid.to_owned(),
                source,
            });
        let enrolled = lock(&self.enrolled).remove(uid);
        self.persist();
        let rules = match enrolled {
            Some(pod) => self.uninstall(uid, pod).await,
            None => Ok(()),
        };
        tracing::info!(%uid, "pod deleted");
        match (tunnels, rules) {
            (Err(e), Err(rules)) => {
                tracing::warn!(error = %rules, "rule removal failed as well");
                Err(e)
            }
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
            (Ok(()), Ok(())) => Ok(()),
        }
    }

    /// The pod runs on but is no longer meshed: remove its rules, then tell the tunnels. In that
    /// order, so its traffic goes direct before its proxy stops, and no connection meets a
    /// capture with no proxy. The netns is reached through the fd the ZDS cache holds (its path
    /// may be a `/proc/<pid>/ns/net` whose process has exited since).
    pub async fn release(&self, uid: &str) -> Result<(), AgentError> {
        let pod = lock(&self.enrolled).remove(uid);
        let netns = self.zds.pod_netns(uid).map(File::from);
        let rules = match (pod, netns) {
            (None, _) => Ok(()),
            // Not cached (cannot happen for an enrolled pod): the path, if still the same netns.
            (Some(pod), None) => {
                self.persist();
                self.uninstall(uid, pod).await
            }
            (Some(pod), Some(netns)) => {
                self.persist();
                let backend = self.backend;
                let options = pod.options;
                in_netns(&netns, uid, &pod.netns, move || {
                    uninstall_pod(&options, backend)
                })
                .await
                .and_then(|r| {
                    r.map_err(|source| AgentError::Uninstall {
                        uid: uid.to_owned(),
                        path: pod.netns.clone(),
                        source,
                    })
                })
            }
        };
        let tunnels = self
            .zds
            .del_pod(uid)
            .await
            .map_err(|source| AgentError::Delete {
                uid: uid.to_owned(),
                source,
            });
        tracing::info!(%uid, "pod released from the mesh: rules removed, tunnels told");
        rules.and(tunnels)
    }

    /// Re-captures the pods of a previous agent run (state file) whose netns is still the same
    /// namespace; the others are gone and skipped. Returns how many were restored.
    pub async fn restore(&self, records: Vec<PodRecord>) -> usize {
        let mut restored = 0;
        for r in records {
            let netns = match open_netns(&r.netns) {
                Ok(f) => f,
                Err(e) => {
                    tracing::info!(uid = %r.uid, netns = %r.netns.display(), error = %e, "not restoring a pod: its netns is gone");
                    continue;
                }
            };
            match netns.metadata() {
                Ok(m) if (m.dev(), m.ino()) == r.netns_id => {}
                _ => {
                    tracing::info!(uid = %r.uid, netns = %r.netns.display(), "not restoring a pod: its netns path now names another namespace");
                    continue;
                }
            }
            let info = WorkloadInfo {
                name: r.name,
                namespace: r.namespace,
                service_account: r.service_account,
            };
            let options = PodOptions {
                inbound_capture: r.inbound_capture,
                dns_capture: r.dns_capture,
                ..PodOptions::default()
            };
            match self
                .enroll(r.uid.clone(), r.netns, netns, info, options)
                .await
            {
                Ok(_) => restored += 1,
                Err(e) => tracing::error!(error = %e, "restoring a pod failed"),
            }
        }
        restored
    }

    /// Finds a running pod's netns by its UID and IPs and enrolls it (live enrollment); the
    /// caller holds the pod's claim.
    async fn enroll_running(&self, facts: &PodFacts) -> Result<TunnelStatus, AgentError> {
        let scan_err = |source| AgentError::Scan {
            uid: facts.uid.clone(),
            namespace: facts.namespace.clone(),
            name: facts.name.clone(),
            source,
        };
        let found = netns_scan::find(
            PathBuf::from(netns_scan::NETNS_RUN_DIR),
            PathBuf::from("/proc"),
            netns_scan::own_netns(),
            facts.uid.clone(),
            facts.ips.clone(),
        )
        .await
        .map_err(scan_err)?
        .ok_or_else(|| AgentError::NoNetns {
            uid: facts.uid.clone(),
            namespace: facts.namespace.clone(),
            name: facts.name.clone(),
            ips: facts.ips.clone(),
        })?;
        let info = WorkloadInfo {
            name: facts.name.clone(),
            namespace: facts.namespace.clone(),
            service_account: facts.service_account.clone(),
        };
        self.enroll(
            facts.uid.clone(),
            found.path,
            found.netns,
            info,
            PodOptions::default(),
        )
        .await
    }

    async fn uninstall(&self, uid: &str, pod: Enrolled) -> Result<(), AgentError> {
        let netns = match open_netns(&pod.netns) {
            Ok(f) => f,
            Err(OpenNetnsError::Open(e)) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // Something else now lives at that path: not ours to touch.
            Err(OpenNetnsError::NotANetns(_)) => return Ok(()),
            Err(OpenNetnsError::Open(source)) => {
                return Err(AgentError::OpenNetns {
                    uid: uid.to_owned(),
                    path: pod.netns,
                    source,
                })
            }
        };
        match netns.metadata() {
            Ok(m) if (m.dev(), m.ino()) == pod.id => {}
            // Another netns now lives at that path (or it cannot be identified): not ours to touch.
            _ => return Ok(()),
        }
        let backend = self.backend;
        let options = pod.options;
        in_netns(&netns, uid, &pod.netns, move || {
            uninstall_pod(&options, backend)
        })
        .await?
        .map_err(|source| AgentError::Uninstall {
            uid: uid.to_owned(),
            path: pod.netns.clone(),
            source,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `f` on a fresh thread inside `netns`; the thread exits afterwards, taking the netns
/// membership with it.
async fn in_netns<T: Send + 'static>(
    netns: &File,
    uid: &str,
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AgentError> {
    let thread_err = |source| AgentError::Thread {
        uid: uid.to_owned(),
        path: path.to_owned(),
        source,
    };
    let fd = netns.try_clone().map_err(thread_err)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("netns-{}", fd.as_raw_fd()))
        .spawn(move || {
            let result = setns(&fd, CloneFlags::CLONE_NEWNET).map(|()| f());
            let _ = tx.send(result);
        })
        .map_err(thread_err)?;
    match rx.await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(AgentError::EnterNetns {
            uid: uid.to_owned(),
            path: path.to_owned(),
            source,
        }),
        Err(_) => Err(AgentError::ThreadPanicked {
            uid: uid.to_owned(),
            path: path.to_owned(),
        }),
    }
}

/// Where the agent listens, which rule backend it uses, how it learns which pods are meshed, and
/// where it records them.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub zds_socket: PathBuf,
    pub admin_socket: PathBuf,
    pub backend: Backend,
    /// Enrollment by label through the Kubernetes API; `None` enrolls every pod the CNI hands
    /// over (VMs, tests, plain containerd).
    pub kube: Option<KubeSettings>,
    /// The state file; `None` keeps the enrolled set in memory only (a restart forgets it).
    pub state_file: Option<PathBuf>,
    /// Namespaces never enrolled by label (keep in step with the CNI plugin's
    /// `exclude_namespaces`).
    pub exclude_namespaces: Vec<String>,
}

/// How long a starting agent waits for the API's first list before it lets tunnels take their
/// snapshot anyway (with the pods of its state file). Pods that the API alone knows to be meshed
/// are then added live as soon as the list arrives; none is ever removed for want of it.
pub const STARTUP_SYNC_TIMEOUT: Duration = Duration::from_secs(15);

/// How often the reconciler looks at the stores without a watch event: retries pods whose netns
/// could not be found or entered, and pods whose enrollment failed.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the agent until `shutdown` completes. Must be called within a Tokio runtime. On start the
/// pod set is rebuilt (state file, then the API) behind the ZDS gate; the admin socket is bound
/// once that is done. On return the admin socket is removed; in-flight requests are abandoned (a
/// CNI ADD then fails and is retried).
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    run_with(config, shutdown, |_| {}).await
}

/// `run`, handing the agent to `on_ready` once its ZDS and admin sockets are bound (`health`).
pub async fn run_with(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(Arc<Agent>),
) -> Result<(), AgentError> {
    for path in [&config.zds_socket, &config.admin_socket] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| AgentError::AdminBind {
                path: path.clone(),
                source,
            })?;
        }
    }
    let zds = ZdsServer::bind_gated(&config.zds_socket)?;
    let k8s = match &config.kube {
        Some(settings) => {
            let k8s = K8s::start(settings)
                .await
                .map_err(|source| AgentError::KubeStart { source })?;
            tracing::info!(node = %settings.node_name, "enrolling pods by label (istio.io/dataplane-mode) from the Kubernetes API");
            Some(k8s)
        }
        None => {
            tracing::info!(
                "no Kubernetes API configured: every pod the CNI plugin hands over is enrolled"
            );
            None
        }
    };
    let state = config.state_file.clone().map(StateFile::new);
    let agent = Arc::new(
        Agent::with(zds, config.backend, k8s, state)
            .exclude_namespaces(config.exclude_namespaces.clone()),
    );

    // Rebuild before any tunnel gets a snapshot.
    if let Some(state) = &agent.state {
        let records = match state.load() {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(error = %e, "previous pod set not restored from the state file");
                Vec::new()
            }
        };
        let total = records.len();
        let restored = agent.restore(records).await;
        tracing::info!(restored, recorded = total, state_file = %state.path().display(), "pods restored from the state file");
        // Entries skipped (netns gone) are dropped from the file now.
        agent.persist();
    }
    let mut reconciler = Reconciler {
        restored: agent.enrolled_uids(),
        ..Reconciler::default()
    };
    if let Some(k8s) = &agent.k8s {
        if k8s.wait_ready(STARTUP_SYNC_TIMEOUT).await {
            // Bounded too: an API that listed and then went slow must not hold every tunnel's
            // snapshot (and every CNI ADD, the admin socket being bound after) for minutes.
            // What is left undone, the reconcile loop finishes (enrolling is idempotent).
            if tokio::time::timeout(STARTUP_SYNC_TIMEOUT, agent.reconcile(&mut reconciler))
                .await
                .is_err()
            {
                tracing::warn!(timeout = ?STARTUP_SYNC_TIMEOUT, "the start-up pass over the API's pods did not finish; tunnels get what is enrolled now, the rest follows");
            }
        } else {
            tracing::warn!(timeout = ?STARTUP_SYNC_TIMEOUT, "the Kubernetes API has not listed pods and namespaces yet; tunnels get the restored pods now, the rest follows when it does");
        }
    }
    agent.zds.open_gate();

    let listener = bind_admin(&config.admin_socket)?;
    tracing::info!(
        zds = %config.zds_socket.display(),
        admin = %config.admin_socket.display(),
        backend = ?config.backend,
        pods = agent.enrolled_uids().len(),
        "redirect agent ready"
    );
    on_ready(agent.clone());
    let mut connections = JoinSet::new();
    let reconcile_task = agent.k8s.is_some().then(|| {
        let agent = agent.clone();
        tokio::spawn(async move {
            loop {
                if let Some(k8s) = &agent.k8s {
                    let _ = tokio::time::timeout(RECONCILE_INTERVAL, k8s.changed()).await;
                }
                agent.reconcile(&mut reconciler).await;
            }
        })
    });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_admin(stream, agent.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "failed to accept an admin connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
    tracing::info!("redirect agent stopping");
    if let Some(task) = reconcile_task {
        task.abort();
    }
    connections.shutdown().await;
    let _ = std::fs::remove_file(&config.admin_socket);
    Ok(())
}

/// What the reconciler remembers between passes.
#[derive(Default)]
struct Reconciler {
    /// Uids seen in the pod store: one that disappears from it was deleted (confirmed by a GET).
    seen: HashSet<String>,
    /// Uids restored from the state file: if the API does not list them, they are checked too.
    restored: HashSet<String>,
    /// Uids whose last live enrollment failed: the error (logged once per streak) and when, so
    /// a pod whose netns cannot be found is not searched for on every watch event.
    failed: HashMap<String, (String, tokio::time::Instant)>,
}

impl Agent {
    fn enrolled_uids(&self) -> HashSet<String> {
        lock(&self.enrolled).keys().cloned().collect()
    }

    fn enrolled_identity(&self, uid: &str) -> Option<(String, String)> {
        lock(&self.enrolled)
            .get(uid)
            .map(|e| (e.info.namespace.clone(), e.info.name.clone()))
    }

    /// One pass: enroll meshed running pods that are not enrolled, release enrolled pods that are
    /// no longer meshed or gone. Releases are confirmed with fresh reads (crate::k8s docs).
    async fn reconcile(&self, r: &mut Reconciler) {
        let Some(k8s) = &self.k8s else { return };
        let Some(pods) = k8s.desired() else { return };
        let in_store: HashSet<String> = pods.iter().map(|(f, _)| f.uid.clone()).collect();
        for (facts, decision) in pods {
            r.seen.insert(facts.uid.clone());
            if self.excluded(&facts.namespace) {
                continue;
            }
            let Some(_claim) = self.try_claim(&facts.uid) else {
                continue;
            };
            let enrolled = self.is_enrolled(&facts.uid);
            if decision.is_meshed() && !enrolled && facts.running && !facts.ips.is_empty() {
                let retry_due = r
                    .failed
                    .get(&facts.uid)
                    .is_none_or(|(_, at)| at.elapsed() >= RECONCILE_INTERVAL);
                if !retry_due {
                    continue;
                }
                match self.enroll_running(&facts).await {
                    Ok(status) => {
                        r.failed.remove(&facts.uid);
                        tracing::info!(uid = %facts.uid, pod = %format!("{}/{}", facts.namespace, facts.name), %decision, ?status, "running pod enrolled");
                    }
                    Err(e) => {
                        let text = e.to_string();
                        if r.failed.get(&facts.uid).map(|(t, _)| t) != Some(&text) {
                            tracing::error!(error = %text, "live enrollment failed; retrying every few seconds");
                        }
                        r.failed
                            .insert(facts.uid.clone(), (text, tokio::time::Instant::now()));
                    }
                }
            } else if !decision.is_meshed() && enrolled {
                self.release_if_confirmed(k8s, &facts.uid, &facts.namespace, &facts.name)
                    .await;
            }
        }
        r.failed.retain(|uid, _| in_store.contains(uid));
        for uid in self.enrolled_uids() {
            if in_store.contains(&uid) {
                continue;
            }
            let Some(_claim) = self.try_claim(&uid) else {
                continue;
            };
            // Only a pod the store showed before (or one restored at start) counts as gone; one
            // enrolled by a CNI ADD just now may simply not have reached the store yet.
            if !(r.seen.contains(&uid) || r.restored.contains(&uid)) {
                continue;
            }
            let Some((namespace, name)) = self.enrolled_identity(&uid) else {
                continue;
            };
            self.release_if_confirmed(k8s, &uid, &namespace, &name)
                .await;
            if !self.is_enrolled(&uid) {
                r.seen.remove(&uid);
                r.restored.remove(&uid);
            }
        }
    }

    async fn release_if_confirmed(&self, k8s: &K8s, uid: &str, namespace: &str, name: &str) {
        match k8s.confirm(namespace, name, uid).await {
            Ok(Confirmed::Exists(decision)) if decision.is_meshed() => {}
            Ok(Confirmed::Exists(decision)) => {
                tracing::info!(%uid, pod = %format!("{namespace}/{name}"), %decision, "releasing the pod");
                if let Err(e) = self.release(uid).await {
                    tracing::error!(error = %e, "releasing a pod failed");
                }
            }
            Ok(Confirmed::Gone) => {
                tracing::info!(%uid, pod = %format!("{namespace}/{name}"), "pod deleted in the Kubernetes API");
                if let Err(e) = self.del(uid).await {
                    tracing::error!(error = %e, "deleting a pod failed");
                }
            }
            Err(e) => {
                tracing::warn!(%uid, error = %e, "not releasing the pod: the Kubernetes API could not confirm it")
            }
        }
    }
}

/// Binds with mode 0600 set before listen(), so no other user can ever connect (same reasoning as
/// the ZDS socket), replacing a stale socket from a previous agent.
fn bind_admin(path: &Path) -> Result<tokio::net::UnixListener, AgentError> {
    let err = |source: io::Error| AgentError::AdminBind {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path).map_err(err)?
        }
        Ok(_) => {
            return Err(AgentError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let sock = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| err(e.into()))?;
    let addr = UnixAddr::new(path).map_err(|e| err(e.into()))?;
    bind(sock.as_raw_fd(), &addr).map_err(|e| err(e.into()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    listen(
        &sock,
        Backlog::new(ADMIN_BACKLOG).map_err(|e| err(e.into()))?,
    )
    .map_err(|e| err(e.into()))?;
    tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(sock)).map_err(err)
}

/// One admin connection: a reply line per request line, until the client closes. Requests carry no
/// fds: the socket is only ever read with read(2), which has no control buffer, so the kernel
/// discards any SCM_RIGHTS a client attaches and they never enter the agent's fd table
/// (reliability case 39).
async fn serve_admin(stream: tokio::net::UnixStream, agent: Arc<Agent>) {
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let reply = match (&mut read)
            .take(MAX_REQUEST_LINE)
            .read_line(&mut line)
            .await
        {
            Ok(0) => return,
            Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST_LINE => {
                let reply = Reply::error(format!(
                    "invalid request: line longer than {MAX_REQUEST_LINE} bytes"
                ));
                let _ = write_reply(&mut write, &reply).await;
                return;
            }
            Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
                Ok(request) => agent.handle(request).await,
                Err(e) => Reply::error(AgentError::InvalidRequest(format!(
                    "{e} (expected one JSON object per line with \"op\": add, del or list)"
                ))),
            },
            Err(e) => {
                tracing::debug!(error = %e, "admin connection read failed");
                return;
            }
        };
        if write_reply(&mut write, &reply).await.is_err() {
            return;
        }
    }
}

async fn write_reply(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    reply: &Reply,
) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await
}

/// A failed admin request on the client side (the agent's own failures come back as a [`Reply`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the redirect agent at {path}: {source} (is `zmesh-redirect agent` running, and are we root?)")]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to the redirect agent at {path} failed: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the redirect agent at {path} closed the connection without replying")]
    Closed { path: PathBuf },
    #[error("the redirect agent at {path} sent an unreadable reply {line:?}: {source}")]
    Decode {
        path: PathBuf,
        line: String,
        source: serde_json::Error,
    },
}

/// Sends one request to the agent at `admin_socket` and returns its reply (blocking, bounded by
/// [`REQUEST_TIMEOUT`]).
pub fn request(admin_socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    let path = admin_socket.to_owned();
    let io_err = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    let stream = UnixStream::connect(admin_socket).map_err(|source| ClientError::Connect {
        path: path.clone(),
        source,
    })?;
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(io_err)?;
    stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .map_err(io_err)?;
    let mut line = serde_json::to_vec(request).map_err(|e| io_err(io::Error::other(e)))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io_err)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(io_err)?;
    if reply.is_empty() {
        return Err(ClientError::Closed { path });
    }
    serde_json::from_str(reply.trim()).map_err(|source| ClientError::Decode {
        path: path.clone(),
        line: reply.trim().to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_request_defaults_and_wire_shape() {
        let req: Request = serde_json::from_str(
            r#"{"op":"add","netns":"/var/run/netns/x","uid":"u","name":"n","namespace":"ns","service_account":"sa"}"#,
        )
        .unwrap();
        let Request::Add(add) = &req else {
            panic!("not an add: {req:?}")
        };
        assert!(add.inbound_capture, "inbound capture defaults to on");
        assert!(!add.dns_capture, "DNS capture defaults to off");
        let back: serde_json::Value = serde_json::to_value(&req).unwrap();
        assert_eq!(back["op"], "add");
        assert_eq!(back["netns"], "/var/run/netns/x");
    }

    #[test]
    fn del_and_list_parse() {
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"del","uid":"u"}"#).unwrap(),
            Request::Del { uid: "u".into() }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"list"}"#).unwrap(),
            Request::List
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"frob"}"#).is_err());
    }

    #[test]
    fn replies_omit_absent_fields() {
        assert_eq!(
            serde_json::to_string(&Reply::ok()).unwrap(),
            r#"{"ok":true}"#
        );
        let pending = Reply {
            tunnel: Some(TunnelStatus::Pending),
            ..Reply::ok()
        };
        assert_eq!(
            serde_json::to_string(&pending).unwrap(),
            r#"{"ok":true,"tunnel":"pending"}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::error("boom")).unwrap(),
            r#"{"ok":false,"error":"boom"}"#
        );
    }
}
