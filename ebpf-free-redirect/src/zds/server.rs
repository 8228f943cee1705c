//! The agent side of ZDS. The agent listens; node tunnels connect. Every pod the agent has
//! captured is cached with its netns fd so that any tunnel that (re)connects gets the full picture:
//! hello, the cache replayed as `add` (one ack each), `snapshot_sent` (acked), then incremental
//! requests. During a tunnel restart or upgrade two tunnels are connected at once: new pods go to
//! the NEWEST tunnel only (the old one is draining), while deletions go to ALL of them, since
//! every tunnel must stop proxying a pod whose netns is gone.
//!
//! A connection is only trusted with new pods once it has earned it (issue 11, finding 3):
//! - it is **ready** only after its hello and an ack for every snapshot request; `add_pod` waits
//!   on the newest READY tunnel, so a connection that stalls in its handshake cannot hold pod
//!   start-up, and a ready tunnel that stops acking is dropped after [`ACK_TIMEOUT`], the pod then
//!   going to the next ready tunnel;
//! - a tunnel still in its snapshot gets later pods queued behind it, as uids: the netns fd is
//!   duplicated from the cache only when that request is actually sent, after every earlier ack,
//!   so a connection that stops acking never collects fds, and holds at most one;
//! - fds the agent never asks for (on a hello, an ack, or unsolicited) are closed on arrival and
//!   the connection is dropped; truncated datagrams likewise;
//! - at most [`MAX_TUNNEL_CONNECTIONS`] connections exist at once; excess ones are closed on accept.

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
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

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

/// How long a freshly connected tunnel has to send its hello before it is dropped. A tunnel sends
/// it right after connecting, so this only matters for a peer that is not speaking ZDS.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Most ZDS connections open at once, handshaking or established. A node runs one tunnel, two
/// during a restart or upgrade hand-over; the rest is headroom for a crash-looping tunnel whose
/// previous connections are still being torn down. Every connection costs a task, a socket and up
/// to one in-flight netns fd, so a flood of connections is bounded by this; an excess connection
/// is closed as soon as it is accepted, and one stuck in its handshake frees its slot within
/// [`HELLO_TIMEOUT`] or [`ACK_TIMEOUT`].
pub const MAX_TUNNEL_CONNECTIONS: usize = 8;

/// Refused and failed connections are each logged at most this often (with the count since the
/// last line), so a flood of hostile connections cannot flood the log too.
const WARN_INTERVAL: Duration = Duration::from_secs(1);

/// Pending connections the kernel queues; tunnels connect one or two at a time (restart hand-over).
const LISTEN_BACKLOG: i32 = 16;

/// A captured pod: what the tunnel needs to serve it.
struct Pod {
    info: WorkloadInfo,
    netns: OwnedFd,
}

/// What a connection task is asked to send. An `Add` names the pod only: its netns is taken from
/// the cache when the request goes out, so queued requests hold no fds.
enum Request {
    Add { uid: String },
    Del { uid: String },
}

/// One request for a connection task, and where to report the ack (if anyone waits for it).
struct Command {
    request: Request,
    reply: Option<oneshot::Sender<Result<(), ZdsError>>>,
}

struct Tunnel {
    id: u64,
    commands: mpsc::UnboundedSender<Command>,
    /// Hello received and every snapshot request acked: trusted with new pods.
    ready: bool,
}

#[derive(Default)]
struct State {
    pods: BTreeMap<String, Pod>,
    /// Connected tunnels that said hello, oldest first.
    tunnels: Vec<Tunnel>,
    next_id: u64,
}

/// Where an `add` ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A ready tunnel acked the pod.
    Acked,
    /// No ready tunnel: the pod is cached (and queued for any tunnel still in its snapshot); the
    /// next tunnel to connect gets it.
    Cached,
}

/// The ZDS listener of the redirect agent, with its pod cache. Dropping it stops accepting and
/// disconnects every tunnel.
pub struct ZdsServer {
    state: Arc<Mutex<State>>,
    path: PathBuf,
    accept_task: JoinHandle<()>,
    /// True once tunnels may take their snapshot; see [`ZdsServer::bind_gated`].
    gate: watch::Sender<bool>,
}

impl ZdsServer {
    /// Listens on `path` (SOCK_SEQPACKET, mode 0600), replacing a stale socket left by a previous
    /// agent. Must be called from within a Tokio runtime: the accept loop is spawned on it.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, ZdsError> {
        let server = Self::bind_gated(path)?;
        server.open_gate();
        Ok(server)
    }

    /// [`ZdsServer::bind`], but tunnels that connect are held after their hello, before their
    /// snapshot is taken, until [`ZdsServer::open_gate`]. A restarted agent rebuilds its pod set
    /// (`add_pod` caches while no tunnel is ready) behind the gate, so no tunnel ever sees a
    /// partial snapshot and stops the proxies of pods that are still meshed.
    pub fn bind_gated(path: impl AsRef<Path>) -> Result<Self, ZdsError> {
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
        let (gate, gate_rx) = watch::channel(false);
        let accept_task = tokio::spawn(accept_loop(listener, state.clone(), gate_rx));
        tracing::info!(path = %path.display(), "ZDS server listening");
        Ok(Self {
            state,
            path,
            accept_task,
            gate,
        })
    }

    /// Whether tunnels may take their snapshot yet.
    pub fn gate_open(&self) -> bool {
        *self.gate.borrow()
    }

    /// Lets held and future tunnels take their snapshot (idempotent).
    pub fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    /// The socket path this server listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a captured pod and hands its netns to the newest ready tunnel, waiting for the ack.
    /// A non-empty ack error is returned verbatim in [`ZdsError::Rejected`]. If that tunnel times
    /// out or disconnects instead, the next newest ready tunnel gets the pod; if none is left, the
    /// last such error is returned. With no ready tunnel the pod is only cached and this returns
    /// [`Delivery::Cached`] at once: the next tunnel gets it in its snapshot. Either way the pod
    /// stays cached (re-adding a uid replaces its entry).
    pub async fn add_pod(
        &self,
        uid: impl Into<String>,
        info: WorkloadInfo,
        netns: OwnedFd,
    ) -> Result<Delivery, ZdsError> {
        let uid = uid.into();
        let ready: Vec<_> = {
            let mut state = lock(&self.state);
            state.pods.insert(uid.clone(), Pod { info, netns });
            let newest_ready = state.tunnels.iter().rposition(|t| t.ready);
            // Tunnels newer than the one that gets the pod are still in their snapshot: they
            // will need the pod too once they take over, so it is queued behind their snapshot.
            let syncing_from = newest_ready.map_or(0, |i| i + 1);
            for tunnel in &state.tunnels[syncing_from..] {
                submit(tunnel, Request::Add { uid: uid.clone() }, None);
            }
            state
                .tunnels
                .iter()
                .filter(|t| t.ready)
                .rev()
                .map(|t| t.commands.clone())
                .collect()
        };
        if ready.is_empty() {
            tracing::debug!(%uid, "no ready node tunnel; pod cached for the next snapshot");
            return Ok(Delivery::Cached);
        }
        let mut last_error = None;
        for commands in ready {
            let (reply, rx) = oneshot::channel();
            let command = Command {
                request: Request::Add { uid: uid.clone() },
                reply: Some(reply),
            };
            if commands.send(command).is_err() {
                continue; // That tunnel disconnected meanwhile.
            }
            match await_reply(rx, "add", &uid).await {
                Ok(()) => return Ok(Delivery::Acked),
                Err(e @ ZdsError::Rejected { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(%uid, error = %e, "newest node tunnel failed the add; trying the next one");
                    last_error = Some(e);
                }
            }
        }
        match last_error {
            Some(e) => Err(e),
            // Every ready tunnel disconnected before the add could be queued.
            None => Ok(Delivery::Cached),
        }
    }

    /// Forgets a pod and tells every connected tunnel, waiting for the acks of the ready ones (a
    /// tunnel still in its snapshot gets the del queued, unawaited); returns the first failure (a
    /// tunnel that disconnects meanwhile is not one). Deleting an unknown uid is still forwarded
    /// (a tunnel may know it from an earlier agent incarnation).
    pub async fn del_pod(&self, uid: &str) -> Result<(), ZdsError> {
        let replies: Vec<_> = {
            let mut state = lock(&self.state);
            state.pods.remove(uid);
            state
                .tunnels
                .iter()
                .filter_map(|tunnel| {
                    let request = Request::Del {
                        uid: uid.to_owned(),
                    };
                    if tunnel.ready {
                        let (reply, rx) = oneshot::channel();
                        submit(tunnel, request, Some(reply));
                        Some(rx)
                    } else {
                        submit(tunnel, request, None);
                        None
                    }
                })
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

    /// A duplicate of a cached pod's netns fd (the agent reaches a pod it releases through it,
    /// so it holds no second fd per pod); `None` for an unknown uid or when dup fails.
    pub fn pod_netns(&self, uid: &str) -> Option<OwnedFd> {
        lock(&self.state).pods.get(uid)?.netns.try_clone().ok()
    }

    /// Uids of the cached pods, sorted.
    pub fn cached_pods(&self) -> Vec<String> {
        lock(&self.state).pods.keys().cloned().collect()
    }

    /// Number of connected tunnels that completed their snapshot (and so get new pods).
    pub fn connected_tunnels(&self) -> usize {
        lock(&self.state).tunnels.iter().filter(|t| t.ready).count()
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

fn submit(tunnel: &Tunnel, request: Request, reply: Option<oneshot::Sender<Result<(), ZdsError>>>) {
    // A closed channel drops `reply`, which `await_reply` reports as TunnelGone.
    let _ = tunnel.commands.send(Command { request, reply });
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

/// The `add` for a cached pod with a fresh duplicate of its netns, or `None` if the pod is no
/// longer cached (deleted since the request was queued: its `del` follows).
fn cached_add(
    state: &Mutex<State>,
    uid: &str,
) -> Result<Option<(WorkloadRequest, OwnedFd)>, ZdsError> {
    let state = lock(state);
    let Some(pod) = state.pods.get(uid) else {
        return Ok(None);
    };
    let netns = pod
        .netns
        .try_clone()
        .map_err(ZdsError::io("duplicate a cached pod netns fd"))?;
    Ok(Some((add_request(uid, &pod.info), netns)))
}

async fn accept_loop(
    listener: tokio::net::UnixListener,
    state: Arc<Mutex<State>>,
    gate: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let slots = Arc::new(Semaphore::new(MAX_TUNNEL_CONNECTIONS));
    let mut refusals = WarnBudget::default();
    let failures = Arc::new(Mutex::new(WarnBudget::default()));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let (state, failures, gate) = (state.clone(), failures.clone(), gate.clone());
                        connections.spawn(async move {
                            if let Err(e) = serve(stream, state, slot, gate).await {
                                let mut failures = failures.lock().unwrap_or_else(|p| p.into_inner());
                                if let Some(suppressed) = failures.take() {
                                    tracing::warn!(error = %e, suppressed, "ZDS connection to a node tunnel ended");
                                }
                            }
                        });
                    }
                    Err(_) => {
                        drop(stream);
                        if let Some(suppressed) = refusals.take() {
                            tracing::warn!(
                                suppressed,
                                max = MAX_TUNNEL_CONNECTIONS,
                                "refused a ZDS connection: too many open; only node tunnels should connect to this socket"
                            );
                        }
                    }
                },
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

/// At most one warning per [`WARN_INTERVAL`] for one kind of event; the ones in between are
/// counted and reported with the next line that is logged.
#[derive(Default)]
struct WarnBudget {
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnBudget {
    /// `Some(events suppressed since the last line)` if this event may be logged now.
    fn take(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < WARN_INTERVAL)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
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

async fn serve(
    stream: tokio::net::UnixStream,
    state: Arc<Mutex<State>>,
    _slot: OwnedSemaphorePermit,
    mut gate: watch::Receiver<bool>,
) -> Result<(), ZdsError> {
    let sock = SeqpacketSocket::from_tokio(stream);

    let hello = tokio::time::timeout(HELLO_TIMEOUT, wire::recv(&sock))
        .await
        .map_err(|_| {
            ZdsError::Protocol(format!(
                "no hello from the node tunnel within {HELLO_TIMEOUT:?}"
            ))
        })??;
    let Datagram::Message { bytes, fds } = hello else {
        return Err(ZdsError::Closed);
    };
    refuse_fds("hello", fds)?;
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

    if !*gate.borrow() {
        tracing::info!(
            "node tunnel connected; holding its snapshot until the agent has rebuilt its pods"
        );
        // The sender lives in the ZdsServer; it is gone only when the server is.
        gate.wait_for(|open| *open)
            .await
            .map_err(|_| ZdsError::Closed)?;
    }

    // Snapshot and registration under one lock: every pod is either in the snapshot or arrives
    // later as a queued command, never neither.
    let (commands_tx, mut commands) = mpsc::unbounded_channel();
    let (snapshot, id, _registration) = {
        let mut st = lock(&state);
        let snapshot: Vec<String> = st.pods.keys().cloned().collect();
        let id = st.next_id;
        st.next_id += 1;
        st.tunnels.push(Tunnel {
            id,
            commands: commands_tx,
            ready: false,
        });
        let registration = Registration {
            state: state.clone(),
            id,
        };
        (snapshot, id, registration)
    };
    tracing::info!(
        pods = snapshot.len(),
        "node tunnel connected; replaying snapshot"
    );

    for uid in snapshot {
        // A pod deleted since the snapshot was taken is skipped; its del is queued for us.
        let Some((request, netns)) = cached_add(&state, &uid)? else {
            continue;
        };
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
    if let Some(tunnel) = lock(&state).tunnels.iter_mut().find(|t| t.id == id) {
        tunnel.ready = true;
    }
    tracing::info!("node tunnel acked the snapshot; it gets new pods from now on");

    loop {
        tokio::select! {
            command = commands.recv() => {
                // The sender lives in the state until `_registration` drops, so None cannot occur
                // while this task runs; treat it as a shutdown anyway.
                let Some(Command { request, reply }) = command else { return Ok(()) };
                let result = match &request {
                    Request::Add { uid } => match cached_add(&state, uid)? {
                        Some((request, netns)) => {
                            exchange(&sock, &request, Some(netns), "add", uid).await
                        }
                        // Deleted before its turn came; the queued del follows.
                        None => Ok(()),
                    },
                    Request::Del { uid } => {
                        exchange(&sock, &del_request(uid), None, "del", uid).await
                    }
                };
                let fatal = match &result {
                    Ok(()) | Err(ZdsError::Rejected { .. }) => None,
                    Err(e) => Some(e.to_string()),
                };
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
                if let Some(e) = fatal {
                    return Err(ZdsError::Protocol(format!("connection abandoned: {e}")));
                }
            }
            // Idle: the tunnel has nothing to say, so a datagram here is EOF or a violation.
            datagram = wire::recv(&sock) => match datagram? {
                Datagram::Eof => {
                    tracing::info!("node tunnel disconnected");
                    return Ok(());
                }
                Datagram::Message { fds, .. } => {
                    refuse_fds("unsolicited message", fds)?;
                    return Err(ZdsError::Protocol(
                        "unsolicited message from the node tunnel (it only sends hello and acks); disconnecting".to_owned(),
                    ));
                }
            },
        }
    }
}

/// The agent never asks a tunnel for fds: any that came are closed here, at once, and the
/// connection is refused (a tunnel that sends them is not speaking ZDS).
fn refuse_fds(what: &str, fds: Vec<OwnedFd>) -> Result<(), ZdsError> {
    if fds.is_empty() {
        return Ok(());
    }
    let count = fds.len();
    drop(fds);
    Err(ZdsError::Protocol(format!(
        "{what} carried {count} fds, expected none; fds closed and connection dropped"
    )))
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
    drop(fds);
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
    refuse_fds("ack", fds)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn warnings_are_limited_per_interval_and_count_the_rest() {
        let mut budget = WarnBudget::default();
        assert_eq!(budget.take(), Some(0));
        for _ in 0..5 {
            assert_eq!(budget.take(), None);
        }
        tokio::time::advance(WARN_INTERVAL).await;
        assert_eq!(budget.take(), Some(5));
        assert_eq!(budget.take(), None);
    }
}
