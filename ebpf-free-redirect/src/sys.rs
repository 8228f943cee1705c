//! The crate's one room for `unsafe` (conventions, item 9): the two kernel calls that neither `nix`
//! nor `socket2` offers safely in the form ZDS needs.
//!
//! - [`recv_with_fds`]: `recvmsg` that takes ownership of EVERY descriptor the kernel installed,
//!   even when it also reports MSG_CTRUNC. `nix` refuses to iterate a truncated control buffer, so
//!   with it the descriptors that did arrive stayed open forever (issue 11, finding 3).
//! - [`namespace_type`]: the `NS_GET_NSTYPE` ioctl, to tell a network namespace from any other
//!   file before `setns`.
//! - [`allocator_stats`]: glibc's `mallinfo2(3)`, the allocator's own view of the heap, which the
//!   node's admin endpoint `/debug/memory` serves for builds on glibc's malloc (`nix` does not
//!   wrap it).
//! - [`jemalloc_thread_idle`] and [`jemalloc_thread_freed`] (feature `jemalloc`): jemalloc's
//!   `thread.idle` control, which hands the calling thread's cache of freed objects back to the
//!   shared arenas so their pages can go back to the kernel once a load is over, and the
//!   thread's count of bytes freed, which tells whether that cache can hold much. They sit here,
//!   beside `mallinfo2`, because this is the workspace's one room for foreign calls; the policy
//!   of when to call them is the node's (`zmesh::alloc`).
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

/// jemalloc's `thread.idle` (jemalloc 5.3): the calling thread flushes its thread cache (freed
/// objects it keeps for reuse) back to the arenas, where their pages become purgeable. For a
/// thread about to go quiet; the caller decides when (`zmesh::alloc`).
#[cfg(feature = "jemalloc")]
pub fn jemalloc_thread_idle() -> io::Result<()> {
    // SAFETY: `thread.idle` neither reads nor writes a value, and jemalloc refuses it (EPERM)
    // unless the three value pointers are null and the new length 0, as here; the name is a
    // NUL-terminated literal.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.idle".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// The bytes the calling thread has freed since it started (jemalloc's `thread.deallocated`,
/// kept without jemalloc's statistics). Read through a MIB looked up once: this runs each time
/// a worker parks.
#[cfg(feature = "jemalloc")]
pub fn jemalloc_thread_freed() -> io::Result<u64> {
    static MIB: std::sync::OnceLock<Result<[usize; 2], i32>> = std::sync::OnceLock::new();
    let mib = MIB.get_or_init(|| {
        let mut mib = [0usize; 2];
        let mut len = mib.len();
        // SAFETY: `mib` has room for `len` entries and jemalloc writes at most that many,
        // updating `len`; the name is a NUL-terminated literal.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctlnametomib(
                c"thread.deallocated".as_ptr(),
                mib.as_mut_ptr(),
                &mut len,
            )
        };
        if rc != 0 {
            Err(rc)
        } else if len != mib.len() {
            Err(libc::EINVAL)
        } else {
            Ok(mib)
        }
    });
    let mib = mib.map_err(io::Error::from_raw_os_error)?;
    let mut value: u64 = 0;
    let mut len = size_of::<u64>();
    // SAFETY: `thread.deallocated` is a uint64_t, read into `value` (`len` bytes, checked
    // below); nothing is written.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctlbymib(
            mib.as_ptr(),
            mib.len(),
            (&mut value as *mut u64).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if len != size_of::<u64>() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(value)
}
