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
//! "inbound_capture":true,"dns_capture":false}`, `{"op":"del","uid":..}`, `{"op":"list"}`; the
//! reply is `{"ok":true,..}` or `{"ok":false,"error":".."}`.
//!
//! Limitation: the pod cache lives in memory. An agent restart forgets enrolled pods (their rules
//! stay in place, so they stay captured), and a tunnel connecting to the new agent gets a snapshot
//! without them. Rebuilding the cache needs the pod list from the Kubernetes API, as istio-cni does.
//!
//! Rules are installed from a dedicated `std::thread` that `setns`'s into the pod netns and then
//! exits. Never from tokio's blocking pool: its threads are reused, and one left inside a pod netns
//! would run some later, unrelated work there.

use std::collections::HashMap;
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
use crate::nsfd::{open_netns, OpenNetnsError};
use crate::rules::{Backend, PodOptions};
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
}

/// The enrollment logic, independent of the admin socket that feeds it.
pub struct Agent {
    zds: ZdsServer,
    backend: Backend,
    enrolled: Mutex<HashMap<String, Enrolled>>,
    counters: crate::health::Counters,
}

impl Agent {
    pub fn new(zds: ZdsServer, backend: Backend) -> Self {
        Self {
            zds,
            backend,
            enrolled: Mutex::new(HashMap::new()),
            counters: Default::default(),
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
            Request::Add(add) => match self.add(add).await {
                Ok(status) => Reply {
                    tunnel: Some(status),
                    ..Reply::ok()
                },
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
        let meta = netns.metadata().map_err(|source| AgentError::OpenNetns {
            uid: uid.clone(),
            path: path.clone(),
            source,
        })?;
        let options = PodOptions {
            inbound_capture: req.inbound_capture,
            dns_capture: req.dns_capture,
            ..PodOptions::default()
        };
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
            },
        );

        let info = WorkloadInfo {
            name: req.name,
            namespace: req.namespace,
            service_account: req.service_account,
        };
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

/// Where the agent listens and which rule backend it uses.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub zds_socket: PathBuf,
    pub admin_socket: PathBuf,
    pub backend: Backend,
}

/// Runs the agent until `shutdown` completes. Must be called within a Tokio runtime. On return the
/// admin socket is removed; in-flight requests are abandoned (a CNI ADD then fails and is retried).
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
    let zds = ZdsServer::bind(&config.zds_socket)?;
    let listener = bind_admin(&config.admin_socket)?;
    tracing::info!(
        zds = %config.zds_socket.display(),
        admin = %config.admin_socket.display(),
        backend = ?config.backend,
        "redirect agent ready"
    );
    let agent = Arc::new(Agent::new(zds, config.backend));
    on_ready(agent.clone());
    let mut connections = JoinSet::new();
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
    connections.shutdown().await;
    let _ = std::fs::remove_file(&config.admin_socket);
    Ok(())
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
