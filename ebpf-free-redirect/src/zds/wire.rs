//! ZDS framing: one protobuf message per SOCK_SEQPACKET datagram, fds attached as SCM_RIGHTS.
//! SEQPACKET keeps message boundaries (no length prefix) and delivers the fds with exactly the
//! datagram they were sent with, which is what lets an `add` bind "this uid" to "this netns".
//!
//! Sockets are non-blocking and driven by the Tokio reactor through [`SeqpacketSocket`]; [`recv`]
//! and [`send`] are cancel-safe because the syscall and all bookkeeping run synchronously once the
//! socket is ready.
//!
//! Received fds are adopted without `unsafe` by reopening `/proc/self/fd/N` (same open file
//! identity for namespace files: same dev and inode) and closing the raw fd at once. That covers
//! every fd ZDS carries (netns files); an fd that cannot be reopened (a socket) is refused.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::io::Interest;

use super::ZdsError;

/// Largest datagram either side reads. Every ZDS message is a uid (a 36-byte UUID) plus a pod name,
/// namespace and service account, each bounded by Kubernetes to 253 bytes, so real messages stay
/// under 1 KiB; 4 KiB leaves room for growth while still catching a peer that is not speaking ZDS.
pub const MAX_DATAGRAM: usize = 4096;

/// Room reserved for received fds: the kernel's SCM_MAX_FD, the most one datagram can carry. With
/// this much control space the kernel never truncates the fd list (MSG_CTRUNC), so every fd that
/// arrives can be seen and closed when the message is rejected.
pub const MAX_FDS_PER_DATAGRAM: usize = 253;

/// A connected, non-blocking SOCK_SEQPACKET socket registered with the Tokio reactor.
///
/// Tokio has no SEQPACKET type, and in the Tokio version used here `AsyncFd::new` is deprecated as
/// unsound while `AsyncFd::register` is `unsafe`, which this crate forbids. So the fd is owned by a
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

/// Receives one datagram. A truncated datagram is an `Err(ZdsError::Truncated)` after every fd that
/// came with it has been closed; the connection itself stays usable.
pub async fn recv(sock: &SeqpacketSocket) -> Result<Datagram, ZdsError> {
    loop {
        sock.io
            .readable()
            .await
            .map_err(ZdsError::io("wait for the ZDS socket to be readable"))?;
        match sock
            .io
            .try_io(Interest::READABLE, || recv_now(sock.io.as_raw_fd()))
        {
            Ok(result) => return result,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(ZdsError::io("receive a ZDS message")(e)),
        }
    }
}

/// One `recvmsg`; the outer error is the syscall's (WouldBlock included, for `try_io`).
fn recv_now(fd: RawFd) -> io::Result<Result<Datagram, ZdsError>> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_DATAGRAM]);
    let (bytes, flags, raw_fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        // MSG_CMSG_CLOEXEC: received fds must not leak into anything the process spawns.
        let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(io::Error::from)?;
        let mut raw_fds = Vec::new();
        // `cmsgs()` refuses to iterate a truncated control buffer; see MAX_FDS_PER_DATAGRAM for
        // why that cannot happen with SCM_RIGHTS alone.
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    raw_fds.extend(fds);
                }
            }
        }
        (msg.bytes, msg.flags, raw_fds)
    };

    let data = flags.contains(MsgFlags::MSG_TRUNC);
    let control = flags.contains(MsgFlags::MSG_CTRUNC);
    if data || control {
        close_raw(&raw_fds);
        return Ok(Err(ZdsError::Truncated {
            bytes,
            data,
            control,
        }));
    }
    if bytes == 0 && raw_fds.is_empty() {
        // SEQPACKET reports EOF as a zero-length read; istio never sends empty messages (every
        // request has a oneof payload), so an empty datagram is treated as EOF too.
        return Ok(Ok(Datagram::Eof));
    }
    buf.truncate(bytes);
    Ok(adopt_all(&raw_fds).map(|fds| Datagram::Message { bytes: buf, fds }))
}

/// Takes ownership of every received fd, or closes them all and fails.
fn adopt_all(raw_fds: &[RawFd]) -> Result<Vec<OwnedFd>, ZdsError> {
    let mut owned = Vec::with_capacity(raw_fds.len());
    for (i, &raw) in raw_fds.iter().enumerate() {
        let reopened = File::open(format!("/proc/self/fd/{raw}"));
        close_raw(&[raw]);
        match reopened {
            Ok(file) => owned.push(OwnedFd::from(file)),
            Err(e) => {
                close_raw(&raw_fds[i + 1..]);
                return Err(ZdsError::Protocol(format!(
                    "received fd {} of {} cannot be used as a network namespace ({e}); only netns fds are accepted",
                    i + 1,
                    raw_fds.len()
                )));
            }
        }
    }
    Ok(owned)
}

fn close_raw(fds: &[RawFd]) {
    for &fd in fds {
        // The fd came from the kernel in this very datagram and nothing else refers to it.
        if let Err(e) = nix::unistd::close(fd) {
            tracing::warn!(fd, error = %e, "failed to close a rejected ZDS fd");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsFd;

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
}
