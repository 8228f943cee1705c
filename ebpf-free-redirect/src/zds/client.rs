//! The node-tunnel side of ZDS, as a library: connect, say hello, then receive one [`ZdsEvent`] at
//! a time and [`ack`](ZdsClient::ack) each. Requests that cannot be valid are answered here with an
//! ack carrying the reason and never reach the caller: an `add` without exactly one fd or whose fd
//! is not a network namespace (checked with fstat and NS_GET_NSTYPE, never by opening it), a
//! truncated datagram, undecodable bytes, an unknown or empty request. Fds of a refused request
//! are closed before the ack is sent. What the requests MEAN
//! (which proxies to start or stop, whether a `del` names a known pod) is the caller's business.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use prost::Message;

use super::proto::workload_request::Payload;
use super::proto::{AckExt, Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello};
use super::wire::{self, Datagram, SeqpacketSocket};
use super::ZdsError;

/// First reconnect delay after the agent's socket goes away (docs/capture.md: backoff 10 ms → 15 s).
/// Short, because an agent restart is quick and pods wait on the snapshot to become ready.
pub const RECONNECT_BACKOFF_INITIAL: Duration = Duration::from_millis(10);
/// Cap on the reconnect delay, so a tunnel notices a returning agent within 15 s at worst.
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(15);
/// Growth factor between attempts.
pub const RECONNECT_BACKOFF_FACTOR: u32 = 2;

/// Exponential reconnect delays, from [`RECONNECT_BACKOFF_INITIAL`] up to [`RECONNECT_BACKOFF_MAX`].
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: RECONNECT_BACKOFF_INITIAL,
        }
    }
}

impl Backoff {
    /// The delay to wait before the next attempt; each call doubles the following one.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * RECONNECT_BACKOFF_FACTOR).min(RECONNECT_BACKOFF_MAX);
        delay
    }

    /// Back to the initial delay, after a connection that got as far as a snapshot.
    pub fn reset(&mut self) {
        self.next = RECONNECT_BACKOFF_INITIAL;
    }
}

/// One request from the agent, to be acked with [`ZdsClient::ack`].
#[derive(Debug)]
pub enum ZdsEvent {
    /// Serve this pod in this netns (replacing any proxy for the uid in another netns).
    Add {
        uid: String,
        info: WorkloadInfo,
        netns: OwnedFd,
    },
    /// Snapshot only: keep serving a pod already known (no fd).
    Keep { uid: String },
    /// The pod is gone. The uid is passed through even if the caller never saw an `add` for it;
    /// whether that is an error (ack with one) or a no-op (ack `Ok`) is the caller's decision.
    Del { uid: String },
    /// The snapshot is complete: pods not added or kept since connecting can be stopped.
    SnapshotSent,
}

/// A connection to the redirect agent's ZDS socket.
pub struct ZdsClient {
    sock: SeqpacketSocket,
    path: PathBuf,
    /// An event was returned and not yet acked; the agent waits for that ack.
    ack_pending: bool,
}

impl ZdsClient {
    /// Connects to the agent at `path` and sends `ZdsHello{V1}`.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ZdsError> {
        let path = path.as_ref().to_path_buf();
        let connect_err = |source: std::io::Error| ZdsError::Connect {
            path: path.clone(),
            source,
        };
        let addr = UnixAddr::new(path.as_os_str().as_bytes()).map_err(|e| connect_err(e.into()))?;
        // Blocking connect on a blocking thread: a unix connect only waits when the agent's
        // backlog is full, and then waiting is the right thing to do.
        let fd = tokio::task::spawn_blocking(move || {
            let fd = socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
            Ok::<_, nix::Error>(fd)
        })
        .await
        .map_err(|e| connect_err(std::io::Error::other(e)))?
        .map_err(|e| connect_err(e.into()))?;
        let sock = SeqpacketSocket::from_fd(fd)?;
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        wire::send(&sock, &hello.encode_to_vec(), &[]).await?;
        tracing::info!(path = %path.display(), "connected to the ZDS agent");
        Ok(Self {
            sock,
            path,
            ack_pending: false,
        })
    }

    /// Retries [`connect`](Self::connect) with exponential backoff until it succeeds.
    pub async fn connect_with_backoff(path: impl AsRef<Path>, backoff: &mut Backoff) -> Self {
        loop {
            match Self::connect(path.as_ref()).await {
                Ok(client) => return client,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "ZDS connect failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The agent socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next valid request. `Ok(None)` means the agent closed the connection (the
    /// caller reconnects; pods keep their capture meanwhile). Invalid requests are acked with an
    /// error and skipped. Errors only for I/O failures or a missing [`ack`](Self::ack).
    pub async fn next_event(&mut self) -> Result<Option<ZdsEvent>, ZdsError> {
        if self.ack_pending {
            return Err(ZdsError::Protocol(
                "next_event called before the previous event was acked; the agent waits for every ack"
                    .to_owned(),
            ));
        }
        loop {
            let rejection = match wire::recv(&self.sock).await {
                Ok(Datagram::Eof) => return Ok(None),
                Ok(Datagram::Message { bytes, fds }) => match validate(&bytes, fds) {
                    Ok(event) => {
                        self.ack_pending = true;
                        return Ok(Some(event));
                    }
                    Err(reason) => reason,
                },
                // Truncated: the datagram is gone (its fds closed), the link is fine.
                Err(e @ ZdsError::Truncated { .. }) => e.to_string(),
                Err(e) => return Err(e),
            };
            tracing::warn!(reason = %rejection, "rejecting an invalid ZDS request");
            self.send_ack(Err(rejection)).await?;
        }
    }

    /// Acks the last event: `Ok(())` on success, `Err(reason)` to report a failure to the agent
    /// (which surfaces the text verbatim).
    pub async fn ack(&mut self, result: Result<(), String>) -> Result<(), ZdsError> {
        if !self.ack_pending {
            return Err(ZdsError::Protocol(
                "ack without a pending event: every event is acked exactly once".to_owned(),
            ));
        }
        self.ack_pending = false;
        self.send_ack(result).await
    }

    async fn send_ack(&self, result: Result<(), String>) -> Result<(), ZdsError> {
        let bytes = WorkloadResponse::ack(result).encode_to_vec();
        wire::send(&self.sock, &bytes, &[]).await
    }
}

/// Turns a datagram into an event, or into the reason to reject it. Fds not moved into the event
/// are dropped (closed) here.
pub(super) fn validate(bytes: &[u8], mut fds: Vec<OwnedFd>) -> Result<ZdsEvent, String> {
    let request = WorkloadRequest::decode(bytes)
        .map_err(|e| format!("malformed WorkloadRequest ({} bytes): {e}", bytes.len()))?;
    let payload = request.payload.ok_or_else(|| {
        "WorkloadRequest has no known payload (empty, or a oneof field this tunnel does not know)"
            .to_owned()
    })?;
    match payload {
        Payload::Add(add) => {
            if fds.len() != 1 {
                return Err(format!(
                    "add for pod {} carried {} fds, expected exactly 1 (the pod netns)",
                    add.uid,
                    fds.len()
                ));
            }
            let netns = fds.remove(0);
            // Refused here, without blocking, so a FIFO or socket never reaches setns.
            crate::nsfd::check_netns(netns.as_fd())
                .map_err(|e| format!("add for pod {}: refusing the passed fd: {e}", add.uid))?;
            Ok(ZdsEvent::Add {
                uid: add.uid,
                info: add.workload_info.unwrap_or_default(),
                netns,
            })
        }
        Payload::Keep(k) => no_fds("keep", fds).map(|()| ZdsEvent::Keep { uid: k.uid }),
        Payload::Del(d) => no_fds("del", fds).map(|()| ZdsEvent::Del { uid: d.uid }),
        Payload::SnapshotSent(_) => no_fds("snapshot_sent", fds).map(|()| ZdsEvent::SnapshotSent),
    }
}

/// Only `add` carries an fd; anything else with fds is refused (and the fds closed on drop).
fn no_fds(kind: &str, fds: Vec<OwnedFd>) -> Result<(), String> {
    if fds.is_empty() {
        Ok(())
    } else {
        Err(format!("{kind} carried {} fds, expected none", fds.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_10ms_and_caps_at_15s() {
        let mut b = Backoff::default();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
        assert_eq!(b.next_delay(), Duration::from_millis(20));
        let last = (0..20).map(|_| b.next_delay()).last().unwrap();
        assert_eq!(last, Duration::from_secs(15));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
    }

    #[test]
    fn add_without_fd_is_rejected_with_the_count() {
        let bytes = WorkloadRequest {
            payload: Some(Payload::Add(super::super::proto::AddWorkload {
                uid: "u1".into(),
                workload_info: None,
            })),
        }
        .encode_to_vec();
        let err = validate(&bytes, vec![]).unwrap_err();
        assert!(err.contains("carried 0 fds"), "{err}");
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(validate(&[0xff, 0xff, 0xff], vec![]).is_err());
        assert!(validate(&[0x22, 0x00], vec![])
            .unwrap_err()
            .contains("no known payload"));
    }
}
