//! The agent side of ZDS. The agent listens; node tunnels connect. Every pod the agent has
//! captured is cached with its netns fd so that any tunnel that (re)connects gets the full picture:
//! hello, the cache replayed as `add` (one ack each), `snapshot_sent` (acked), then incremental
//! requests. During a tunnel restart or upgrade two tunnels are connected at once: new pods go to
//! the NEWEST tunnel only (the old one is draining), while deletions go to ALL of them, since
//! every tunnel must stop proxying a pod whose netns is gone.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use super::proto::workload_request::Payload;
use super::proto::workload_response;
use super::proto::{
    AddWorkload, DelWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello,
};
use super::wire::{self, Datagram, SeqpacketSocket};
use super::ZdsError;

/// How long a tunnel may take to ack one request. Bounded so a wedged tunnel cannot hold pod
/// start-up (which waits on the ack of its `add`) forever; binding a pod's listeners takes
/// milliseconds, so this is generous.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a freshly connected tunnel has to send its hello before it is dropped.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Pending connections the kernel queues; tunnels connect one or two at a time (restart hand-over).
const LISTEN_BACKLOG: i32 = 16;

/// A captured pod: what the tunnel needs to serve it.
struct Pod {
    info: WorkloadInfo,
    netns: OwnedFd,
}

/// One request for a connection task, with the fd to attach and where to report the ack.
struct Command {
    request: WorkloadRequest,
    netns: Option<OwnedFd>,
    reply: oneshot::Sender<Result<(), ZdsError>>,
}

struct Tunnel {
    id: u64,
    commands: mpsc::UnboundedSender<Command>,
}

#[derive(Default)]
struct State {
    pods: BTreeMap<String, Pod>,
    /// Connected tunnels that said hello, oldest first: the last one is the newest.
    tunnels: Vec<Tunnel>,
    next_id: u64,
}

/// The ZDS listener of the redirect agent, with its pod cache. Dropping it stops accepting and
/// disconnects every tunnel.
pub struct ZdsServer {
    state: Arc<Mutex<State>>,
    path: PathBuf,
    accept_task: JoinHandle<()>,
}

impl ZdsServer {
    /// Listens on `path` (SOCK_SEQPACKET, mode 0600), replacing a stale socket left by a previous
    /// agent. Must be called from within a Tokio runtime: the accept loop is spawned on it.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, ZdsError> {
        let path = path.as_ref().to_path_buf();
        let bind_err = |source: std::io::Error| ZdsError::Bind {
            path: path.clone(),
            source,
        };
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_socket() => {
                std::fs::remove_file(&path).map_err(bind_err)?
            }
            Ok(_) => return Err(ZdsError::NotASocket { path }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| bind_err(e.into()))?;
        let addr = UnixAddr::new(&path).map_err(|e| bind_err(e.into()))?;
        bind(sock.as_raw_fd(), &addr).map_err(|e| bind_err(e.into()))?;
        // Restrict before listen(): nobody can connect until then, so there is no window in
        // which another local user could pose as a tunnel and receive pod netns fds.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_err)?;
        let backlog = Backlog::new(LISTEN_BACKLOG).map_err(|e| bind_err(e.into()))?;
        listen(&sock, backlog).map_err(|e| bind_err(e.into()))?;
        // std's UnixListener is only a typed owner here: accept(2) is the same for SEQPACKET.
        let listener =
            tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(sock))
                .map_err(bind_err)?;

        let state = Arc::new(Mutex::new(State::default()));
        let accept_task = tokio::spawn(accept_loop(listener, state.clone()));
        tracing::info!(path = %path.display(), "ZDS server listening");
        Ok(Self {
            state,
            path,
            accept_task,
        })
    }

    /// The socket path this server listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a captured pod and hands its netns to the newest connected tunnel, waiting for the
    /// ack. A non-empty ack error is returned verbatim in [`ZdsError::Rejected`]. If no tunnel is
    /// connected the pod is only cached and this returns `Ok(())` at once: the next tunnel gets it
    /// in its snapshot. Either way the pod stays cached (re-adding a uid replaces its entry), even
    /// when the tunnel rejects it or disconnects ([`ZdsError::TunnelGone`]) before acking.
    pub async fn add_pod(
        &self,
        uid: impl Into<String>,
        info: WorkloadInfo,
        netns: OwnedFd,
    ) -> Result<(), ZdsError> {
        let uid = uid.into();
        let dup = netns
            .try_clone()
            .map_err(ZdsError::io("duplicate the pod netns fd"))?;
        let request = add_request(&uid, &info);
        let pending = {
            let mut state = lock(&self.state);
            state.pods.insert(uid.clone(), Pod { info, netns });
            state
                .tunnels
                .last()
                .map(|tunnel| submit(tunnel, request, Some(dup)))
        };
        match pending {
            None => {
                tracing::debug!(%uid, "no node tunnel connected; pod cached for the next snapshot");
                Ok(())
            }
            Some(reply) => await_reply(reply, "add", &uid).await,
        }
    }

    /// Forgets a pod and tells every connected tunnel, waiting for all acks; returns the first
    /// failure (a tunnel that disconnects meanwhile is not one). Deleting an unknown uid is still forwarded (a tunnel may know it from an earlier
    /// agent incarnation).
    pub async fn del_pod(&self, uid: &str) -> Result<(), ZdsError> {
        let replies: Vec<_> = {
            let mut state = lock(&self.state);
            state.pods.remove(uid);
            state
                .tunnels
                .iter()
                .map(|tunnel| submit(tunnel, del_request(uid), None))
                .collect()
        };
        let mut first_error = None;
        for reply in replies {
            match await_reply(reply, "del", uid).await {
                // A tunnel that disconnected has no proxy left to stop.
                Ok(()) | Err(ZdsError::TunnelGone { .. }) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Uids of the cached pods, sorted.
    pub fn cached_pods(&self) -> Vec<String> {
        lock(&self.state).pods.keys().cloned().collect()
    }

    /// Number of tunnels that said hello and are still connected.
    pub fn connected_tunnels(&self) -> usize {
        lock(&self.state).tunnels.len()
    }
}

impl Drop for ZdsServer {
    fn drop(&mut self) {
        // The accept task owns the connection tasks (a JoinSet), so this disconnects them too.
        self.accept_task.abort();
    }
}

/// Locks the state; a poisoned lock only means another task panicked mid-update of plain data.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn submit(
    tunnel: &Tunnel,
    request: WorkloadRequest,
    netns: Option<OwnedFd>,
) -> oneshot::Receiver<Result<(), ZdsError>> {
    let (reply, rx) = oneshot::channel();
    // A closed channel drops `reply`, which `await_reply` reports as TunnelGone.
    let _ = tunnel.commands.send(Command {
        request,
        netns,
        reply,
    });
    rx
}

async fn await_reply(
    reply: oneshot::Receiver<Result<(), ZdsError>>,
    request: &'static str,
    uid: &str,
) -> Result<(), ZdsError> {
    reply.await.unwrap_or_else(|_| {
        Err(ZdsError::TunnelGone {
            request,
            uid: uid.to_owned(),
        })
    })
}

fn add_request(uid: &str, info: &WorkloadInfo) -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(Payload::Add(AddWorkload {
            uid: uid.to_owned(),
            workload_info: Some(info.clone()),
        })),
    }
}

fn del_request(uid: &str) -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(Payload::Del(DelWorkload {
            uid: uid.to_owned(),
        })),
    }
}

async fn accept_loop(listener: tokio::net::UnixListener, state: Arc<Mutex<State>>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    connections.spawn(async move {
                        if let Err(e) = serve(stream, state).await {
                            tracing::warn!(error = %e, "ZDS connection to a node tunnel ended");
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends are transient; back off instead of spinning.
                    tracing::warn!(error = %e, "failed to accept a ZDS connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

/// Removes a tunnel from the routing table when its connection task ends, however it ends.
struct Registration {
    state: Arc<Mutex<State>>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.state).tunnels.retain(|t| t.id != self.id);
    }
}

async fn serve(stream: tokio::net::UnixStream, state: Arc<Mutex<State>>) -> Result<(), ZdsError> {
    let sock = SeqpacketSocket::from_tokio(stream);

    let hello = tokio::time::timeout(HELLO_TIMEOUT, wire::recv(&sock))
        .await
        .map_err(|_| {
            ZdsError::Protocol(format!(
                "no hello from the node tunnel within {HELLO_TIMEOUT:?}"
            ))
        })??;
    let Datagram::Message { bytes, .. } = hello else {
        return Err(ZdsError::Closed);
    };
    let hello = ZdsHello::decode(bytes.as_slice()).map_err(|source| ZdsError::Decode {
        what: "hello",
        source,
    })?;
    if hello.version != Version::V1 as i32 {
        return Err(ZdsError::Protocol(format!(
            "node tunnel announced ZDS version {}, this agent speaks only V1",
            hello.version
        )));
    }

    // Snapshot and registration under one lock: every pod is either in the snapshot or arrives
    // later as a queued command, never both and never neither.
    let (commands_tx, mut commands) = mpsc::unbounded_channel();
    let (snapshot, _registration) = {
        let mut st = lock(&state);
        let mut snapshot = Vec::with_capacity(st.pods.len());
        for (uid, pod) in &st.pods {
            let netns = pod
                .netns
                .try_clone()
                .map_err(ZdsError::io("duplicate a cached pod netns fd"))?;
            snapshot.push((add_request(uid, &pod.info), netns, uid.clone()));
        }
        let id = st.next_id;
        st.next_id += 1;
        st.tunnels.push(Tunnel {
            id,
            commands: commands_tx,
        });
        let registration = Registration {
            state: state.clone(),
            id,
        };
        (snapshot, registration)
    };
    tracing::info!(
        pods = snapshot.len(),
        "node tunnel connected; replaying snapshot"
    );

    for (request, netns, uid) in snapshot {
        match exchange(&sock, &request, Some(netns), "add", &uid).await {
            Ok(()) => {}
            // The tunnel refused one pod; the others still deserve their proxies.
            Err(e @ ZdsError::Rejected { .. }) => {
                tracing::warn!(error = %e, "snapshot add rejected")
            }
            Err(e) => return Err(e),
        }
    }
    let snapshot_sent = WorkloadRequest {
        payload: Some(Payload::SnapshotSent(SnapshotSent {})),
    };
    match exchange(&sock, &snapshot_sent, None, "snapshot_sent", "-").await {
        Ok(()) => {}
        Err(e @ ZdsError::Rejected { .. }) => tracing::warn!(error = %e, "snapshot_sent rejected"),
        Err(e) => return Err(e),
    }

    loop {
        tokio::select! {
            command = commands.recv() => {
                // The sender lives in the state until `_registration` drops, so None cannot occur
                // while this task runs; treat it as a shutdown anyway.
                let Some(Command { request, netns, reply }) = command else { return Ok(()) };
                let (kind, uid) = describe(&request);
                let result = exchange(&sock, &request, netns, kind, &uid).await;
                let fatal = match &result {
                    Ok(()) | Err(ZdsError::Rejected { .. }) => None,
                    Err(e) => Some(e.to_string()),
                };
                let _ = reply.send(result);
                if let Some(e) = fatal {
                    return Err(ZdsError::Protocol(format!("connection abandoned: {e}")));
                }
            }
            // Idle: the tunnel has nothing to say, so a datagram here is either EOF or noise.
            datagram = wire::recv(&sock) => match datagram? {
                Datagram::Eof => {
                    tracing::info!("node tunnel disconnected");
                    return Ok(());
                }
                Datagram::Message { .. } => tracing::warn!("ignoring an unsolicited ZDS message"),
            },
        }
    }
}

fn describe(request: &WorkloadRequest) -> (&'static str, String) {
    match &request.payload {
        Some(Payload::Add(a)) => ("add", a.uid.clone()),
        Some(Payload::Del(d)) => ("del", d.uid.clone()),
        Some(Payload::Keep(k)) => ("keep", k.uid.clone()),
        Some(Payload::SnapshotSent(_)) => ("snapshot_sent", "-".to_owned()),
        None => ("empty request", "-".to_owned()),
    }
}

/// Sends one request (with its fd, if any) and waits for its ack.
async fn exchange(
    sock: &SeqpacketSocket,
    request: &WorkloadRequest,
    netns: Option<OwnedFd>,
    kind: &'static str,
    uid: &str,
) -> Result<(), ZdsError> {
    let gone = || ZdsError::TunnelGone {
        request: kind,
        uid: uid.to_owned(),
    };
    let fds: Vec<_> = netns.iter().map(AsFd::as_fd).collect();
    match wire::send(sock, &request.encode_to_vec(), &fds).await {
        Err(ZdsError::Io { source, .. }) if is_disconnect(&source) => return Err(gone()),
        other => other?,
    }
    // Our duplicate of the netns is no longer needed once the kernel has its own reference.
    drop(netns);
    let datagram = tokio::time::timeout(ACK_TIMEOUT, wire::recv(sock))
        .await
        .map_err(|_| ZdsError::AckTimeout {
            request: kind,
            uid: uid.to_owned(),
            timeout: ACK_TIMEOUT,
        })?;
    let datagram = match datagram {
        Err(ZdsError::Io { source, .. }) if is_disconnect(&source) => return Err(gone()),
        other => other?,
    };
    let Datagram::Message { bytes, fds } = datagram else {
        return Err(gone());
    };
    if !fds.is_empty() {
        tracing::warn!(count = fds.len(), "closing fds sent along with a ZDS ack");
    }
    let response =
        WorkloadResponse::decode(bytes.as_slice()).map_err(|source| ZdsError::Decode {
            what: "ack",
            source,
        })?;
    match response.payload {
        Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(()),
        Some(workload_response::Payload::Ack(ack)) => Err(ZdsError::Rejected {
            request: kind,
            uid: uid.to_owned(),
            error: ack.error,
        }),
        None => Err(ZdsError::Protocol(format!(
            "the node tunnel answered {kind} of pod {uid} with a response that is not an ack"
        ))),
    }
}

/// The peer went away: EPIPE on send, ECONNRESET on receive.
fn is_disconnect(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
}
