//! One DNS listener pair (a UDP socket and a TCP listener on the same address) and the loop that
//! serves it. A message is parsed once; what the mesh knows is answered at once on the receive
//! path, and a forwarded query runs in its own task under the in-flight bound, so one slow
//! upstream never holds up the answers of the others.
//!
//! Bad input never gets further than the parse: it is dropped and counted by reason
//! (`zmesh_dns_dropped_total`), and the loop goes on. TCP clients are capped in number and
//! disconnected when idle.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_proto::op::{Message, ResponseCode};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::resolve::{self, Decision};
use super::upstream::Upstream;
use super::{query_type_label, DnsMetrics, DropReason};
use crate::config::dns::DnsConfig;
use crate::model::Model;
use crate::netns::PodNetns;

/// The longest UDP query accepted. A query is one question plus an OPT record (well under
/// 600 bytes); the EDNS payload we advertise bounds what a client may send.
const MAX_UDP_QUERY: usize = resolve::EDNS_PAYLOAD as usize;

/// What a DNS listener needs to know of its scope.
pub trait Clients: Send + Sync + 'static {
    /// The model as it is now.
    fn model(&self) -> Arc<Model>;
    /// The namespace of the client at `ip`, for its search domains (None: not a workload).
    fn namespace(&self, ip: IpAddr) -> Option<String>;
}

/// The UDP socket and TCP listener of one DNS proxy.
pub struct DnsListeners {
    pub udp: UdpSocket,
    pub tcp: TcpListener,
}

impl DnsListeners {
    /// Binds both on `addr` in the node's namespace (host mode).
    pub fn bind(addr: SocketAddr) -> io::Result<DnsListeners> {
        let (udp, tcp) = sockets(addr)?;
        finish(udp, tcp)
    }

    /// Binds both on `addr` inside a pod's namespace (in-pod mode).
    pub async fn bind_in(netns: &PodNetns, addr: SocketAddr) -> io::Result<DnsListeners> {
        let (udp, tcp) = netns.run_async(move || sockets(addr)).await?;
        finish(udp, tcp)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }
}

fn sockets(addr: SocketAddr) -> io::Result<(Socket, Socket)> {
    let domain = Domain::for_address(addr);
    let bound = |t, p| -> io::Result<Socket> {
        let s = Socket::new(domain, t, Some(p))?;
        s.set_reuse_address(true)?;
        // A restarted node binds beside the old one (as the TCP listeners do).
        s.set_reuse_port(true)?;
        s.bind(&addr.into()).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot bind DNS {addr}: {e}"))
        })?;
        Ok(s)
    };
    let udp = bound(Type::DGRAM, Protocol::UDP)?;
    // Port 0 (tests): TCP takes the port UDP got.
    let tcp_addr = SocketAddr::new(addr.ip(), udp.local_addr()?.as_socket().map_or(0, |a| a.port()));
    let tcp = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    tcp.set_reuse_address(true)?;
    tcp.set_reuse_port(true)?;
    tcp.bind(&tcp_addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind DNS {tcp_addr}/tcp: {e}")))?;
    tcp.listen(128)?;
    Ok((udp, tcp))
}

fn finish(udp: Socket, tcp: Socket) -> io::Result<DnsListeners> {
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    Ok(DnsListeners {
        udp: UdpSocket::from_std(udp.into())?,
        tcp: TcpListener::from_std(tcp.into())?,
    })
}

/// A DNS proxy: the scope it serves, where it forwards, and its bounds.
pub struct Server {
    clients: Arc<dyn Clients>,
    upstream: Upstream,
    cluster_domain: String,
    ttl: u32,
    tcp_idle: std::time::Duration,
    inflight: Arc<Semaphore>,
    tcp_slots: Arc<Semaphore>,
    metrics: DnsMetrics,
    accept_warnings: crate::rejections::LogLimiter,
}

/// What a received message leads to.
enum Step {
    /// Send this (or nothing).
    Done(Option<Vec<u8>>),
    /// Forward `query` upstream while holding an in-flight slot.
    Forward {
        raw: Vec<u8>,
        query: Box<Message>,
        _permit: OwnedSemaphorePermit,
    },
}

impl Server {
    pub fn new(
        clients: Arc<dyn Clients>,
        upstream: Upstream,
        cfg: &DnsConfig,
        metrics: DnsMetrics,
    ) -> Server {
        Server {
            clients,
            upstream,
            cluster_domain: resolve::normalize(&cfg.cluster_domain)
                .unwrap_or_else(|| "cluster.local".into()),
            ttl: cfg.ttl,
            tcp_idle: cfg.tcp_idle_timeout,
            inflight: Arc::new(Semaphore::new(cfg.max_inflight)),
            tcp_slots: Arc::new(Semaphore::new(cfg.max_tcp_connections)),
            metrics,
            // Out of descriptors, accept fails every pause: a few lines a minute say enough.
            accept_warnings: crate::rejections::LogLimiter::new(5, std::time::Duration::from_secs(60)),
        }
    }

    /// Parses and judges one message; `limit` is the UDP size bound (None over TCP).
    fn prepare(&self, bytes: &[u8], client: IpAddr, protocol: &'static str, udp: bool) -> Step {
        let query = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(%client, error = %e, "malformed DNS message dropped");
                self.metrics.dropped(DropReason::Malformed);
                return Step::Done(None);
            }
        };
        let model = self.clients.model();
        let ns = self.clients.namespace(client);
        let search = resolve::search_domains(ns.as_deref(), &self.cluster_domain);
        let decision = resolve::decide(&model, &search, &query, self.ttl);
        if !matches!(decision, Decision::Ignore) {
            let t = query.query().map_or("other", |q| query_type_label(q.query_type()));
            self.metrics.request(t, protocol);
        }
        match decision {
            Decision::Ignore => {
                self.metrics.dropped(DropReason::NotAQuery);
                Step::Done(None)
            }
            Decision::Answer(a) => Step::Done(encode(&a, &query, udp)),
            Decision::Forward => match self.inflight.clone().try_acquire_owned() {
                Ok(permit) => Step::Forward {
                    raw: bytes.to_vec(),
                    query: Box::new(query),
                    _permit: permit,
                },
                Err(_) => {
                    self.metrics.dropped(DropReason::Overloaded);
                    Step::Done(None)
                }
            },
        }
    }

    /// Forwards, and encodes what goes back to the client: the upstream's answer as it came
    /// (truncated for a UDP client when too long), or SERVFAIL.
    async fn forward(&self, raw: &[u8], query: &Message, udp: bool) -> Option<Vec<u8>> {
        match self.upstream.forward(raw, query.id(), &self.metrics).await {
            Ok(answer) if !udp || answer.len() <= resolve::udp_limit(query) => Some(answer),
            Ok(answer) => match Message::from_vec(&answer) {
                Ok(m) => resolve::fit_udp(&m, resolve::udp_limit(query)),
                Err(_) => encode(&resolve::reply(query, ResponseCode::ServFail), query, udp),
            },
            Err(e) => {
                tracing::debug!(error = %e, "DNS query forwarding failed: SERVFAIL");
                encode(&resolve::reply(query, ResponseCode::ServFail), query, udp)
            }
        }
    }

    pub fn metrics(&self) -> &DnsMetrics {
        &self.metrics
    }
}

fn encode(answer: &Message, query: &Message, udp: bool) -> Option<Vec<u8>> {
    if udp {
        resolve::fit_udp(answer, resolve::udp_limit(query))
    } else {
        answer.to_vec().ok()
    }
}

/// Serves `listeners` until `stop` flips.
pub async fn serve(server: Arc<Server>, listeners: DnsListeners, mut stop: watch::Receiver<bool>) {
    let udp = Arc::new(listeners.udp);
    let tcp = listeners.tcp;
    let mut buf = vec![0u8; MAX_UDP_QUERY + 1];
    loop {
        tokio::select! {
            r = udp.recv_from(&mut buf) => match r {
                Ok((n, peer)) => on_datagram(&server, &udp, &buf[..n], peer),
                Err(e) => {
                    // ICMP errors of earlier replies surface here; they say nothing of the socket.
                    tracing::debug!(error = %e, "DNS UDP receive error");
                }
            },
            r = tcp.accept() => match r {
                Ok((s, peer)) => on_connection(&server, s, peer),
                Err(e) => crate::rejections::accept_failed(&server.accept_warnings, "DNS", &e).await,
            },
            _ = stop.changed() => return,
        }
    }
}

fn on_datagram(server: &Arc<Server>, udp: &Arc<UdpSocket>, msg: &[u8], peer: SocketAddr) {
    if msg.len() > MAX_UDP_QUERY {
        server.metrics.dropped(DropReason::Oversized);
        return;
    }
    match server.prepare(msg, peer.ip(), "udp", true) {
        Step::Done(Some(reply)) => {
            // A full send buffer drops the reply: the client retries, as it would for any loss.
            let _ = udp.try_send_to(&reply, peer);
        }
        Step::Done(None) => {}
        Step::Forward { raw, query, _permit } => {
            let (server, udp) = (server.clone(), udp.clone());
            tokio::spawn(async move {
                let _permit = _permit;
                if let Some(reply) = server.forward(&raw, &query, true).await {
                    let _ = udp.send_to(&reply, peer).await;
                }
            });
        }
    }
}

fn on_connection(server: &Arc<Server>, mut s: TcpStream, peer: SocketAddr) {
    let Ok(slot) = server.tcp_slots.clone().try_acquire_owned() else {
        server.metrics.dropped(DropReason::TcpLimit);
        return; // dropping the stream closes it
    };
    let server = server.clone();
    tokio::spawn(async move {
        let _slot = slot;
        loop {
            // Idle means no complete message within the deadline (a slow drip counts as idle).
            let read = async {
                let n = usize::from(s.read_u16().await?);
                let mut msg = vec![0u8; n];
                s.read_exact(&mut msg).await?;
                io::Result::Ok(msg)
            };
            let msg = match tokio::time::timeout(server.tcp_idle, read).await {
                Ok(Ok(m)) => m,
                Ok(Err(_)) => return, // EOF or reset: the client is done
                Err(_) => {
                    server.metrics.dropped(DropReason::TcpIdle);
                    return;
                }
            };
            let reply = match server.prepare(&msg, peer.ip(), "tcp", false) {
                Step::Done(Some(r)) => r,
                // A malformed message or a response over TCP: the stream cannot be trusted.
                Step::Done(None) => return,
                Step::Forward { raw, query, _permit } => {
                    match server.forward(&raw, &query, false).await {
                        Some(r) => r,
                        None => return,
                    }
                }
            };
            let Ok(len) = u16::try_from(reply.len()) else { return };
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&reply);
            if s.write_all(&framed).await.is_err() {
                return;
            }
        }
    });
}
