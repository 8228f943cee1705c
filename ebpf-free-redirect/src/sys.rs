//! The crate's one room for `unsafe` (conventions, item 9): the two kernel calls that neither `nix`
//! nor `socket2` offers safely in the form ZDS needs.
//!
//! - [`recv_with_fds`]: `recvmsg` that takes ownership of EVERY descriptor the kernel installed,
//!   even when it also reports MSG_CTRUNC. `nix` refuses to iterate a truncated control buffer, so
//!   with it the descriptors that did arrive stayed open forever (issue 11, finding 3).
//! - [`namespace_type`]: the `NS_GET_NSTYPE` ioctl, to tell a network namespace from any other
//!   file before `setns`.
//! - [`allocator_stats`]: glibc's `mallinfo2(3)`, the allocator's own view of the heap, which the
//!   node's admin endpoint `/debug/memory` serves (zmesh uses glibc malloc, which has no pprof
//!   heap profiler; `nix` does not wrap it).
//!
//! Everything around these calls (what to accept, what to refuse, error texts) lives in safe code.
#![allow(unsafe_code)]

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::libc::{self, c_int, c_uint};

/// What one `recvmsg` returned.
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes of the datagram written into the caller's buffer.
    pub bytes: usize,
    /// MSG_TRUNC: the datagram was longer than the buffer.
    pub data_truncated: bool,
    /// MSG_CTRUNC: more descriptors (or other control data) were sent than there was room for;
    /// the kernel installed only those that fit and dropped the rest itself.
    pub control_truncated: bool,
    /// Every descriptor installed in our table by this call, owned: dropping them closes them.
    pub fds: Vec<OwnedFd>,
}

/// One `recvmsg(2)` on `sock` with room for `max_fds` SCM_RIGHTS descriptors, received with
/// MSG_CMSG_CLOEXEC so none leaks into a spawned process (iptables). The socket's own blocking
/// mode applies; a non-blocking socket with nothing queued is `ErrorKind::WouldBlock`.
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<Received> {
    let fd_bytes = c_uint::try_from(max_fds * size_of::<c_int>())
        .map_err(|_| io::Error::other("descriptor room does not fit a control message"))?;
    // SAFETY: CMSG_SPACE is arithmetic on its argument; it reads no memory.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    // u64 elements: the kernel writes `cmsghdr`s here, which need 8-byte alignment.
    let mut control = vec![0u64; space.div_ceil(size_of::<u64>())];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data for which all-zero bytes are a valid (empty) value; this
    // also zeroes any padding field some libcs have.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at one iovec describing `buf` (valid for writes of `buf.len()` bytes)
    // and at `control` (valid for writes of at least `space` bytes); all three outlive the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut fds = Vec::new();
    let control_start = control.as_ptr() as usize;
    let control_end = control_start + space;
    // SAFETY: `msg` is the header the kernel just filled in; CMSG_FIRSTHDR only reads its
    // msg_control/msg_controllen and returns null when there is no complete header.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: non-null CMSG_FIRSTHDR/CMSG_NXTHDR results point at a whole, aligned cmsghdr
        // inside `control` (they check the header fits within msg_controllen).
        let (level, kind, len) =
            unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: as above, `cmsg` is a valid header; CMSG_DATA/CMSG_LEN are pointer and
            // length arithmetic.
            let (data, header) = unsafe { (libc::CMSG_DATA(cmsg), libc::CMSG_LEN(0) as usize) };
            // cmsg_len is size_t with glibc but socklen_t with musl, hence the cast.
            #[allow(clippy::unnecessary_cast)]
            let claimed = (len as usize).saturating_sub(header) / size_of::<c_int>();
            // Never trust a length beyond our own buffer, whatever the header says.
            let room = control_end.saturating_sub(data as usize) / size_of::<c_int>();
            for i in 0..claimed.min(room) {
                // SAFETY: `data + i` lies within `control` (bounded by `room` above); the data is
                // not necessarily aligned for c_int, hence read_unaligned.
                let raw = unsafe { data.cast::<c_int>().add(i).read_unaligned() };
                // SAFETY: SCM_RIGHTS entries are descriptors the kernel installed in our table
                // during this very call; nothing else knows them, so we are their only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: `msg` and `cmsg` are as above; CMSG_NXTHDR returns null past the last header.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(Received {
        bytes: n as usize,
        data_truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        control_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        fds,
    })
}

/// The namespace type of an nsfs file (`NS_GET_NSTYPE`, Linux 4.11+): a `CLONE_NEW*` value.
/// Callers must first make sure `fd` is on nsfs (see `crate::nsfd`), so this ioctl number is never
/// sent to a device driver that could read it differently.
pub(crate) fn namespace_type(fd: BorrowedFd<'_>) -> io::Result<c_int> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only returns an int; `fd` is a live descriptor
    // borrowed for the duration of the call.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), libc::NS_GET_NSTYPE) };
    if kind < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(kind)
    }
}

/// glibc's allocator statistics (`mallinfo2(3)`), in bytes except the two counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Bytes obtained with `brk`/`sbrk` (the main arena) plus the other arenas' mmapped heaps.
    pub arena: u64,
    /// Free chunks in the arenas.
    pub free_chunks: u64,
    /// Chunks allocated with `mmap` (large allocations) and their bytes.
    pub mmap_chunks: u64,
    pub mmap_bytes: u64,
    /// Bytes in use by the program (allocated and not freed), arenas only.
    pub in_use: u64,
    /// Bytes free in the arenas, held by the allocator but not returned to the kernel.
    pub free: u64,
    /// Releasable at the top of the heap (`malloc_trim` could give it back).
    pub releasable: u64,
}

/// The allocator's statistics, or None where the C library is not glibc.
pub fn allocator_stats() -> Option<AllocatorStats> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no argument, only reads the allocator's own bookkeeping
        // under its locks, and returns a plain struct by value (glibc 2.33+, which the
        // supported images (Debian 12) have).
        let m = unsafe { libc::mallinfo2() };
        Some(AllocatorStats {
            arena: m.arena as u64,
            free_chunks: m.ordblks as u64,
            mmap_chunks: m.hblks as u64,
            mmap_bytes: m.hblkhd as u64,
            in_use: m.uordblks as u64,
            free: m.fordblks as u64,
            releasable: m.keepcost as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}
