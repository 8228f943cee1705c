//! [`PacketCapture`]: records every frame crossing one interface inside a
//! namespace, in both directions, so tests can assert what actually went
//! over the wire (ports used, plaintext absent, ...) without tcpdump.
//!
//! It uses an `AF_PACKET`/`ETH_P_ALL` raw socket created inside the
//! namespace. Binding a packet socket to one device needs a hand-built
//! `sockaddr_ll`, which nix only accepts through `unsafe`; instead the socket
//! listens on all interfaces of the namespace and keeps frames whose
//! `sll_ifindex` (reported by `recvfrom`) matches. Test namespaces carry
//! little traffic, so the filtering cost is irrelevant and the crate stays
//! free of `unsafe`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use nix::errno::Errno;
use nix::net::if_::if_nametoindex;
use nix::sys::socket::{
    recvfrom, setsockopt, socket, sockopt, AddressFamily, LinkAddr, SockFlag, SockProtocol,
    SockType,
};
use nix::sys::time::{TimeVal, TimeValLike};

use crate::{check_ifname, Frame, Netns};

/// `sll_pkttype` of frames this host transmitted (linux/if_packet.h).
const PACKET_OUTGOING: u8 = 4;

/// Read timeout: bounds how long `stop` waits for the reader to notice.
const POLL: Duration = Duration::from_millis(50);

/// After `stop` is requested, keep draining for at most this long so frames
/// already queued (or still in flight, like a final FIN/ACK) are kept, but a
/// chatty namespace cannot keep the reader alive forever.
const DRAIN_LIMIT: Duration = Duration::from_millis(300);

/// Large enough for offloaded TSO/GRO super-packets (up to 64 KiB + headers).
const BUF_LEN: usize = 256 * 1024;

/// Socket receive buffer, so bursts are not dropped while the reader thread
/// is descheduled.
const RCVBUF: usize = 8 << 20;

/// A running capture on one interface; see [`PacketCapture::start`].
#[derive(Debug)]
pub struct PacketCapture {
    ifname: String,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<Result<Vec<Frame>>>>,
}

impl PacketCapture {
    /// Starts capturing all frames on `ifname` in `ns`.
    ///
    /// The socket exists when this returns, so every frame sent afterwards
    /// is recorded; no sleep is needed before generating traffic.
    pub fn start(ns: &Netns, ifname: &str) -> Result<PacketCapture> {
        check_ifname(ifname)?;
        let (fd, ifindex) = ns
            .run(|| open_socket(ifname))
            .with_context(|| format!("capture on {}:{ifname}", ns.name()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let reader = std::thread::Builder::new()
            .name(format!("capture-{ifname}"))
            .spawn({
                let stop = Arc::clone(&stop);
                move || read_frames(&fd, ifindex, &stop)
            })?;
        Ok(PacketCapture {
            ifname: ifname.to_owned(),
            stop,
            reader: Some(reader),
        })
    }

    /// Stops the capture and returns the frames in arrival order.
    pub fn stop(mut self) -> Result<Vec<Frame>> {
        self.stop.store(true, Ordering::Release);
        let reader = self
            .reader
            .take()
            .ok_or_else(|| anyhow!("capture already stopped"))?;
        reader
            .join()
            .map_err(|_| anyhow!("capture reader for {} panicked", self.ifname))?
    }
}

impl Drop for PacketCapture {
    fn drop(&mut self) {
        // A capture dropped without `stop` (e.g. test panicked) must not leave
        // its thread spinning.
        self.stop.store(true, Ordering::Release);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Runs on a thread inside the namespace: resolves the interface and opens
/// the packet socket there, so both refer to that namespace.
fn open_socket(ifname: &str) -> Result<(OwnedFd, u32)> {
    let ifindex = if_nametoindex(ifname).with_context(|| format!("no interface {ifname}"))?;
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .context("AF_PACKET socket (needs CAP_NET_RAW)")?;
    let poll = TimeVal::milliseconds(POLL.as_millis() as i64);
    setsockopt(&fd, sockopt::ReceiveTimeout, &poll)?;
    // Force variant ignores rmem_max (we are root); fall back to the capped
    // one rather than failing the test.
    if setsockopt(&fd, sockopt::RcvBufForce, &RCVBUF).is_err() {
        setsockopt(&fd, sockopt::RcvBuf, &RCVBUF)?;
    }
    Ok((fd, ifindex))
}

fn read_frames(fd: &OwnedFd, ifindex: u32, stop: &AtomicBool) -> Result<Vec<Frame>> {
    let mut buf = vec![0u8; BUF_LEN];
    let mut frames = Vec::new();
    let mut drain_deadline = None;
    loop {
        if stop.load(Ordering::Acquire) {
            let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN_LIMIT);
            if Instant::now() >= deadline {
                break;
            }
        }
        match recvfrom::<LinkAddr>(fd.as_raw_fd(), &mut buf) {
            Ok((n, Some(addr))) if addr.ifindex() == ifindex as usize => {
                let mut frame = Frame::parse(&buf[..n]);
                frame.outgoing = addr.pkttype() == PACKET_OUTGOING;
                frames.push(frame);
            }
            Ok((_, Some(_))) => {} // another interface of the namespace
            Ok((_, None)) => return Err(anyhow!("packet socket returned no sockaddr_ll")),
            // Timeout with nothing queued: once stopping, we are drained.
            Err(Errno::EAGAIN) if drain_deadline.is_some() => break,
            Err(Errno::EAGAIN | Errno::EINTR) => {}
            Err(e) => return Err(anyhow!("reading packet socket: {e}")),
        }
    }
    Ok(frames)
}
