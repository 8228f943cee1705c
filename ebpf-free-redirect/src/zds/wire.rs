//! ZDS framing: one protobuf message per SOCK_SEQPACKET datagram, fds attached as SCM_RIGHTS.
//! SEQPACKET keeps message boundaries (no length prefix) and delivers the fds with exactly the
//! datagram they were sent with, which is what lets an `add` bind "this uid" to "this netns".
//!
//! Sockets are non-blocking and driven by the Tokio reactor through [`SeqpacketSocket`]; [`recv`]
//! and [`send`] are cancel-safe because the syscall and all bookkeeping run synchronously once the
//! socket is ready.
//!
//! Received fds are owned (`OwnedFd`) the moment `recvmsg` returns, including those of a datagram
//! the kernel flagged MSG_CTRUNC (see `crate::sys`), so a rejected message can never leave one
//! open. Nothing here opens or inspects them: whether an fd is a netns is the receiver's check
//! (`crate::nsfd`), made without blocking. (An earlier version reopened `/proc/self/fd/N`, which
//! waits forever on a FIFO.)

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::Interest;

use super::ZdsError;
use crate::sys;

/// Largest datagram either side reads. Every ZDS message is a uid (a 36-byte UUID) plus a pod name,
/// namespace and service account, each bounded by Kubernetes to 253 bytes, so real messages stay
/// under 1 KiB; 4 KiB leaves room for growth while still catching a peer that is not speaking ZDS.
pub const MAX_DATAGRAM: usize = 4096;

/// Room for received fds in one datagram. A ZDS message carries at most one (the pod netns of an
/// `add`); a little more room lets a peer that sends two or three be told how many it sent. A
/// datagram with more is MSG_CTRUNC: the kernel installs only this many in our table (and closes
/// the rest itself), so one datagram can never cost more than this many descriptors, which
/// [`recv`] then closes. The old room of 253 (SCM_MAX_FD) let each datagram take 253.
pub const MAX_FDS_PER_DATAGRAM: usize = 4;

/// A connected, non-blocking SOCK_SEQPACKET socket registered with the Tokio reactor.
///
/// Tokio has no SEQPACKET type, and in the Tokio version used here `AsyncFd::new` is deprecated as
/// unsound while `AsyncFd::register` is `unsafe`, which this crate keeps to `crate::sys`. So the fd is owned by a
/// `tokio::net::UnixStream`, used ONLY as a safe registered owner: readiness, `try_io`, and the raw
/// fd for `sendmsg`/`recvmsg`. Its byte-stream read/write methods are never called (they would
/// silently split datagrams), which is why the field is private.
#[derive(Debug)]
pub struct SeqpacketSocket {
    io: tokio::net::UnixStream,
}

impl SeqpacketSocket {
    /// Takes over a connected SEQPACKET socket, making it non-blocking.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, ZdsError> {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)
            .map_err(ZdsError::io("make the ZDS socket non-blocking"))?;
        let io = tokio::net::UnixStream::from_std(std)
            .map_err(ZdsError::io("register the ZDS socket with the runtime"))?;
        Ok(Self::from_tokio(io))
    }

    /// Wraps a socket accepted by a Tokio listener (already non-blocking and registered).
    pub(crate) fn from_tokio(io: tokio::net::UnixStream) -> Self {
        Self { io }
    }
}

/// One received datagram.
#[derive(Debug)]
pub enum Datagram {
    /// A message and the fds that arrived with it, in order.
    Message { bytes: Vec<u8>, fds: Vec<OwnedFd> },
    /// The peer closed the connection (a zero-length read with no fds).
    Eof,
}

/// Sends one message, with `fds` attached as a single SCM_RIGHTS control message.
pub async fn send(
    sock: &SeqpacketSocket,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), ZdsError> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(ZdsError::TooLarge { len: bytes.len() });
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    loop {
        sock.io
            .writable()
            .await
            .map_err(ZdsError::io("wait for the ZDS socket to be writable"))?;
        let sent = sock.io.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(bytes)];
            let rights = [ControlMessage::ScmRights(&raw)];
            let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
            // MSG_NOSIGNAL: a closed peer is an EPIPE error here, never a process-killing SIGPIPE.
            sendmsg::<()>(
                sock.io.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(n) => {
                return Err(ZdsError::Protocol(format!(
                    "short send on a SEQPACKET socket ({n} of {} bytes)",
                    bytes.len()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(ZdsError::io("send a ZDS message")(e)),
        }
    }
}

/// Receives one datagram. A truncated datagram (data or fds) is an `Err(ZdsError::Truncated)` after
/// every fd that came with it has been closed; the connection itself stays usable. Fds of a good
/// datagram are returned owned: whoever drops the [`Datagram`] closes them.
pub async fn recv(sock: &SeqpacketSocket) -> Result<Datagram, ZdsError> {
    loop {
        sock.io
            .readable()
            .await
            .map_err(ZdsError::io("wait for the ZDS socket to be readable"))?;
        match sock
            .io
            .try_io(Interest::READABLE, || recv_now(sock.io.as_fd()))
        {
            Ok(result) => return result,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(ZdsError::io("receive a ZDS message")(e)),
        }
    }
}

/// One `recvmsg`; the outer error is the syscall's (WouldBlock included, for `try_io`). Every fd
/// that arrived is owned from here on, so an early return closes it.
fn recv_now(fd: BorrowedFd<'_>) -> io::Result<Result<Datagram, ZdsError>> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let sys::Received {
        bytes,
        data_truncated: data,
        control_truncated: control,
        fds,
    } = sys::recv_with_fds(fd, &mut buf, MAX_FDS_PER_DATAGRAM)?;
    if data || control {
        let closed = fds.len();
        drop(fds);
        tracing::debug!(bytes, closed, "closed the fds of a truncated ZDS datagram");
        return Ok(Err(ZdsError::Truncated {
            bytes,
            data,
            control,
        }));
    }
    if bytes == 0 && fds.is_empty() {
        // SEQPACKET reports EOF as a zero-length read; istio never sends empty messages (every
        // request has a oneof payload), so an empty datagram is treated as EOF too.
        return Ok(Ok(Datagram::Eof));
    }
    buf.truncate(bytes);
    Ok(Ok(Datagram::Message { bytes: buf, fds }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::fs::File;

    fn pair() -> (SeqpacketSocket, SeqpacketSocket) {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        (
            SeqpacketSocket::from_fd(a).unwrap(),
            SeqpacketSocket::from_fd(b).unwrap(),
        )
    }

    #[tokio::test]
    async fn message_and_fd_arrive_together() {
        let (a, b) = pair();
        let ns = File::open("/proc/self/ns/net").unwrap();
        send(&a, b"hello", &[ns.as_fd()]).await.unwrap();
        match recv(&b).await.unwrap() {
            Datagram::Message { bytes, fds } => {
                assert_eq!(bytes, b"hello");
                assert_eq!(fds.len(), 1);
            }
            Datagram::Eof => panic!("unexpected EOF"),
        }
        drop(a);
        assert!(matches!(recv(&b).await.unwrap(), Datagram::Eof));
    }

    #[tokio::test]
    async fn oversized_datagram_is_rejected_as_truncated() {
        let (a, b) = pair();
        let big = vec![0u8; MAX_DATAGRAM + 1];
        assert!(matches!(
            send(&a, &big, &[]).await,
            Err(ZdsError::TooLarge { .. })
        ));
        // Bypass `send`'s check to make the receiver see MSG_TRUNC.
        let iov = [IoSlice::new(&big)];
        sendmsg::<()>(a.io.as_raw_fd(), &iov, &[], MsgFlags::empty(), None).unwrap();
        assert!(matches!(
            recv(&b).await,
            Err(ZdsError::Truncated { data: true, .. })
        ));
    }

    /// More fds than the room: the kernel installs only MAX_FDS_PER_DATAGRAM and flags
    /// MSG_CTRUNC; every installed one must come back owned (nix would hand back none of them).
    #[test]
    fn control_truncation_still_hands_over_every_installed_fd() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let ns = File::open("/proc/self/ns/net").unwrap();
        // One datagram carrying `n` copies of a descriptor.
        let send = |n: usize| {
            let raw = vec![ns.as_raw_fd(); n];
            sendmsg::<()>(
                a.as_raw_fd(),
                &[IoSlice::new(b"flood")],
                &[ControlMessage::ScmRights(&raw)],
                MsgFlags::empty(),
                None,
            )
            .unwrap();
        };
        send(250);
        let mut buf = [0u8; 64];
        let got = sys::recv_with_fds(b.as_fd(), &mut buf, MAX_FDS_PER_DATAGRAM).unwrap();
        assert!(got.control_truncated && !got.data_truncated);
        assert_eq!(got.bytes, 5);
        assert_eq!(got.fds.len(), MAX_FDS_PER_DATAGRAM);

        // Within the room: all of them, no truncation.
        send(MAX_FDS_PER_DATAGRAM);
        let got = sys::recv_with_fds(b.as_fd(), &mut buf, MAX_FDS_PER_DATAGRAM).unwrap();
        assert!(!got.control_truncated);
        assert_eq!(got.fds.len(), MAX_FDS_PER_DATAGRAM);
    }
}
