//! Socket options the tunnel depends on: SO_MARK (so capture rules skip our own traffic),
//! IP_TRANSPARENT (to dial the local app from the original client's IP), SO_ORIGINAL_DST (the
//! destination before REDIRECT), TCP_NODELAY and keepalive. All through socket2; no unsafe.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::hbone::DIAL_TIMEOUT;
use crate::netns::PodNetns;

/// Istio's tunnel socket mark (0x539). Capture rules match it to never redirect our own sockets.
pub const TUNNEL_MARK: u32 = 1337;
/// TCP keepalive as ztunnel sets it: 180 s idle, 180 s between probes, 9 probes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(180);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(180);
const KEEPALIVE_RETRIES: u32 = 9;
/// Accept backlog for the node's listeners: bursts of new connections must not be dropped.
const LISTEN_BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connection to {addr} timed out after {DIAL_TIMEOUT:?}: is a firewall dropping it?")]
    Timeout { addr: SocketAddr },
    #[error("connection to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up a socket for {addr}: {what}: {source}")]
    Setup {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// How an outgoing socket is made.
#[derive(Debug, Clone, Copy, Default)]
pub struct DialOptions {
    /// SO_MARK for the socket; None leaves it unmarked (tests without capture).
    pub mark: Option<u32>,
    /// Bind to this source address first. With `transparent`, it may be a non-local address.
    pub source: Option<IpAddr>,
    pub transparent: bool,
}

static TRANSPARENT_WARNED: AtomicBool = AtomicBool::new(false);

/// Applies the per-connection options every proxied socket gets.
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let ka = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = SockRef::from(stream).set_tcp_keepalive(&ka);
}

/// Dials `addr` with a deadline and the given options.
pub async fn dial(addr: SocketAddr, opts: DialOptions) -> Result<TcpStream, DialError> {
    dial_in(None, addr, opts).await
}

/// Dials from inside a pod's network namespace (in-pod mode) or, with `None`, from ours.
pub async fn dial_in(
    netns: Option<&PodNetns>,
    addr: SocketAddr,
    opts: DialOptions,
) -> Result<TcpStream, DialError> {
    let setup = |what: &'static str| move |source| DialError::Setup { addr, what, source };
    let new = move || Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP));
    let socket = match netns {
        Some(ns) => ns.run_async(new).await,
        None => new(),
    }
    .map_err(setup("socket"))?;
    socket.set_nonblocking(true).map_err(setup("O_NONBLOCK"))?;
    if let Some(mark) = opts.mark {
        socket.set_mark(mark).map_err(setup(
            "SO_MARK (needs CAP_NET_ADMIN; without it capture would loop our own traffic)",
        ))?;
    }
    if let Some(src) = opts.source {
        let mut bound = false;
        if opts.transparent {
            match socket
                .set_ip_transparent(true)
                .and_then(|_| socket.set_freebind(true))
                .and_then(|_| socket.bind(&SocketAddr::new(src, 0).into()))
            {
                Ok(()) => bound = true,
                Err(e) => {
                    if !TRANSPARENT_WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "IP_TRANSPARENT unavailable (needs CAP_NET_ADMIN); applications will see the tunnel's address instead of the client's");
                    }
                }
            }
        } else if socket.bind(&SocketAddr::new(src, 0).into()).is_ok() {
            bound = true;
        }
        if !bound {
            tracing::debug!(source = %src, "dialing without a source binding");
        }
    }
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    let stream = match tokio::time::timeout(DIAL_TIMEOUT, socket.connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(DialError::Connect { addr, source }),
        Err(_) => return Err(DialError::Timeout { addr }),
    };
    tune(&stream);
    Ok(stream)
}

/// Binds a listener (SO_REUSEADDR; SO_REUSEPORT so a new process can bind beside an old one).
pub fn listen(addr: SocketAddr, transparent: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    finish_listener(socket, addr, transparent)
}

/// `listen` inside a pod's network namespace: the socket is created (and bound) there.
pub async fn listen_in(
    netns: &PodNetns,
    addr: SocketAddr,
    transparent: bool,
) -> io::Result<TcpListener> {
    let socket = netns
        .run_async(move || {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            // Bind inside the namespace: the address belongs to the pod's interfaces.
            s.set_reuse_address(true)?;
            // Marked like every tunnel socket, so no capture rule ever matches our own traffic.
            s.set_mark(TUNNEL_MARK)?;
            s.set_reuse_port(true)?;
            if transparent {
                let _ = s.set_ip_transparent(true);
            }
            s.bind(&addr.into()).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot bind {addr} in pod netns: {e}"))
            })?;
            Ok(s)
        })
        .await?;
    socket.set_nonblocking(true)?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

fn finish_listener(socket: Socket, addr: SocketAddr, transparent: bool) -> io::Result<TcpListener> {
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if transparent {
        // Lets REDIRECTed or TPROXY connections to foreign addresses land here.
        let _ = socket.set_ip_transparent(true);
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// The destination a connection had before iptables REDIRECT rewrote it.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr()?;
    let addr = if local.is_ipv4() {
        sock.original_dst()?
    } else {
        sock.original_dst_ipv6()?
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_ORIGINAL_DST returned a non-IP address",
        )
    })
}
