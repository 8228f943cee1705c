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
        s.bind(&addr.into())
            .map_err(|e| io::Error::new(e.kind(), format!("cannot bind DNS {addr}: {e}")))?;
        Ok(s)
    };
    let udp = bound(Type::DGRAM, Protocol::UDP)?;
    // Port 0 (tests): TCP takes the port UDP got.
    let tcp_addr = SocketAddr::new(
        addr.ip(),
        udp.local_addr()?.as_socket().map_or(0, |a| a.port()),
    );
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
            accept_warnings: crate::rejections::LogLimiter::new(
                5,
                std::time::Duration::from_secs(60),
            ),
        }
    }

    /// Judges one message (`respond`), counting it, and takes an in-flight slot for a
    /// forwarded one.
    fn prepare(&self, bytes: &[u8], client: IpAddr, protocol: &'static str, udp: bool) -> Step {
        let model = self.clients.model();
        let ns = self.clients.namespace(client);
        let search = resolve::search_domains(ns.as_deref(), &self.cluster_domain);
        let (query_type, response) = respond(&model, &search, self.ttl, bytes, udp);
        if let Some(t) = query_type {
            self.metrics.request(t, protocol);
        }
        match response {
            Response::Drop(reason) => {
                tracing::debug!(%client, reason = reason.label(), "DNS message dropped");
                self.metrics.dropped(reason);
                Step::Done(None)
            }
            Response::Reply(r) => Step::Done(r),
            Response::Forward(query) => match self.inflight.clone().try_acquire_owned() {
                Ok(permit) => Step::Forward {
                    raw: bytes.to_vec(),
                    query,
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
        match self.upstream.forward(raw, &self.metrics).await {
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

/// What the proxy does with one received message, before any I/O.
#[derive(Debug)]
pub enum Response {
    /// Say nothing, counted under this reason.
    Drop(DropReason),
    /// Send these bytes (None: the answer could not be encoded, which hickory reports for
    /// nothing it parsed itself; nothing is sent).
    Reply(Option<Vec<u8>>),
    /// Not a mesh name: forward this query upstream.
    Forward(Box<Message>),
}

/// The pure core of the proxy (what the `dns` fuzz target drives): parses `bytes`, decides
/// against `model` with the client's `search` domains, and encodes the answer for UDP (`udp`:
/// within the client's size limit, else truncated) or TCP. Also returns the query-type label
/// when the message was a query (for `istio_dns_requests_total`).
pub fn respond(
    model: &Model,
    search: &[String],
    ttl: u32,
    bytes: &[u8],
    udp: bool,
) -> (Option<&'static str>, Response) {
    let query = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => return (None, Response::Drop(DropReason::Malformed)),
    };
    let label = query
        .query()
        .map_or("other", |q| query_type_label(q.query_type()));
    match resolve::decide(model, search, &query, ttl) {
        Decision::Ignore => (None, Response::Drop(DropReason::NotAQuery)),
        Decision::Answer(a) => (Some(label), Response::Reply(encode(&a, &query, udp))),
        Decision::Forward => (Some(label), Response::Forward(Box::new(query))),
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
                Ok((s, peer)) => on_connection(&server, s, peer, &stop),
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
        Step::Forward {
            raw,
            query,
            _permit,
        } => {
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

/// Serves one TCP client until it is done, idle, or `stop` flips (a pod's listener stops with
/// its pod: no connection task may outlive it, holding a slot and the pod's namespace).
fn on_connection(
    server: &Arc<Server>,
    s: TcpStream,
    peer: SocketAddr,
    stop: &watch::Receiver<bool>,
) {
    let Ok(slot) = server.tcp_slots.clone().try_acquire_owned() else {
        server.metrics.dropped(DropReason::TcpLimit);
        return; // dropping the stream closes it
    };
    let server = server.clone();
    let mut stop = stop.clone();
    tokio::spawn(async move {
        let _slot = slot;
        tokio::select! {
            _ = serve_connection(&server, s, peer) => {}
            _ = stop.changed() => {}
        }
    });
}

async fn serve_connection(server: &Server, mut s: TcpStream, peer: SocketAddr) {
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
            Step::Forward {
                raw,
                query,
                _permit,
            } => match server.forward(&raw, &query, false).await {
                Some(r) => r,
                None => return,
            },
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&reply);
        // A client that never reads would block the write forever: the idle deadline
        // bounds writes too.
        match tokio::time::timeout(server.tcp_idle, s.write_all(&framed)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                server.metrics.dropped(DropReason::TcpIdle);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use hickory_proto::op::{Edns, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use std::time::Duration;

    struct Fixed(Arc<Model>);

    impl Clients for Fixed {
        fn model(&self) -> Arc<Model> {
            self.0.clone()
        }
        fn namespace(&self, _: IpAddr) -> Option<String> {
            Some("shop".into())
        }
    }

    fn model() -> Arc<Model> {
        let text = "node:
  name: n1
  certificates: { file_ca: { dir: /tmp/ca } }
  dns: { enabled: true }
services:
  - { name: cart, namespace: shop, hostname: cart.shop.svc.cluster.local,
      vips: [10.96.0.20], ports: { 80: 8080 } }
";
        Arc::new(Model::from_config(&Config::parse(text, "test").unwrap()))
    }

    /// A proxy on 127.0.0.1 (a free port) forwarding to `upstreams`.
    async fn start(upstreams: Vec<SocketAddr>, cfg: DnsConfig) -> (SocketAddr, Arc<Server>) {
        let (addr, server, tx) = start_stoppable(upstreams, cfg).await;
        // The proxy runs until the test's runtime ends.
        std::mem::forget(tx);
        (addr, server)
    }

    async fn start_stoppable(
        upstreams: Vec<SocketAddr>,
        cfg: DnsConfig,
    ) -> (SocketAddr, Arc<Server>, watch::Sender<bool>) {
        let l = DnsListeners::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let up = Upstream::new(
            upstreams,
            "test".into(),
            addr,
            cfg.upstream_timeout,
            None,
            None,
        );
        let server = Arc::new(Server::new(
            Arc::new(Fixed(model())),
            up,
            &cfg,
            DnsMetrics::default(),
        ));
        let (tx, rx) = watch::channel(false);
        tokio::spawn(serve(server.clone(), l, rx));
        (addr, server, tx)
    }

    fn query(id: u16, name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(id)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    async fn ask_udp(proxy: SocketAddr, q: &[u8]) -> Option<Message> {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(q, proxy).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf))
            .await
            .ok()?
            .unwrap();
        Some(Message::from_vec(&buf[..n]).unwrap())
    }

    async fn ask_tcp(proxy: SocketAddr, q: &[u8]) -> Message {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(q).await.unwrap();
        let n = usize::from(s.read_u16().await.unwrap());
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await.unwrap();
        Message::from_vec(&buf).unwrap()
    }

    fn ipv4s(m: &Message) -> Vec<String> {
        m.answers()
            .iter()
            .map(|r| match r.data() {
                RData::A(a) => a.0.to_string(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    /// A fake resolver: over UDP it answers TC with no records; over TCP, 40 A records (too
    /// many for a 512-byte UDP answer). Returns its address (UDP and TCP on one port).
    async fn truncating_upstream() -> SocketAddr {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).await.unwrap();
        let answer = |q: &Message, truncated: bool| {
            let mut a = resolve::reply(q, ResponseCode::NoError);
            a.set_truncated(truncated);
            if !truncated {
                for i in 0..40u8 {
                    a.add_answer(Record::from_rdata(
                        q.queries()[0].name().clone(),
                        60,
                        RData::A(A::new(192, 0, 2, i)),
                    ));
                }
            }
            a.to_vec().unwrap()
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, from) = udp.recv_from(&mut buf).await.unwrap();
                let q = Message::from_vec(&buf[..n]).unwrap();
                udp.send_to(&answer(&q, true), from).await.unwrap();
            }
        });
        tokio::spawn(async move {
            loop {
                let (mut s, _) = tcp.accept().await.unwrap();
                let n = usize::from(s.read_u16().await.unwrap());
                let mut buf = vec![0u8; n];
                s.read_exact(&mut buf).await.unwrap();
                let a = answer(&Message::from_vec(&buf).unwrap(), false);
                s.write_all(&(a.len() as u16).to_be_bytes()).await.unwrap();
                s.write_all(&a).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn mesh_names_over_udp_and_tcp_and_forwarded_names_retry_over_tcp() {
        let up = truncating_upstream().await;
        let (proxy, server) = start(vec![up], DnsConfig::default()).await;
        // A mesh name by short name, both transports.
        let a = ask_udp(proxy, &query(1, "cart", RecordType::A))
            .await
            .unwrap();
        assert_eq!((a.id(), ipv4s(&a)), (1, vec!["10.96.0.20".to_string()]));
        let a = ask_tcp(proxy, &query(2, "cart.shop.", RecordType::A)).await;
        assert_eq!(ipv4s(&a), ["10.96.0.20"]);
        // An external name: the upstream says TC over UDP, the proxy asks again over TCP; the
        // 40-record answer does not fit 512 bytes, so a UDP client without EDNS gets TC...
        let a = ask_udp(proxy, &query(3, "big.example.", RecordType::A))
            .await
            .unwrap();
        assert!(a.truncated() && a.answers().is_empty(), "{a:?}");
        // ...a client with EDNS gets it all, and so does a TCP client.
        let mut m = Message::from_vec(&query(4, "big.example.", RecordType::A)).unwrap();
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        m.set_edns(edns);
        let a = ask_udp(proxy, &m.to_vec().unwrap()).await.unwrap();
        assert_eq!((a.truncated(), a.answers().len()), (false, 40));
        let a = ask_tcp(proxy, &query(5, "big.example.", RecordType::A)).await;
        assert_eq!(a.answers().len(), 40);
        // Three forwarded queries, each UDP then TCP upstream.
        assert_eq!(server.metrics().upstream_requests_total(), 6);
        assert_eq!(server.metrics().upstream_failures_total(), 0);
    }

    #[tokio::test]
    async fn hostile_input_is_dropped_and_counted_and_the_proxy_still_answers() {
        // A silent upstream holds every forwarded query for its deadline: a flood of them
        // fills `max_inflight` and the rest are dropped.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let cfg = DnsConfig {
            max_inflight: 2,
            upstream_timeout: Duration::from_secs(5),
            ..DnsConfig::default()
        };
        let (proxy, server) = start(vec![silent.local_addr().unwrap()], cfg).await;
        let m = server.metrics().clone();
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // Garbage, a short header, a compression pointer to itself, a name of 5 x 63 bytes.
        let mut looped = vec![0, 9, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        looped.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        let long = ["x".repeat(63).as_str(); 5].join(".");
        let mut long_q = vec![0, 10, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in long.split('.') {
            long_q.push(l.len() as u8);
            long_q.extend_from_slice(l.as_bytes());
        }
        long_q.extend_from_slice(&[0, 0, 1, 0, 1]);
        for bad in [
            b"\xff\xfe garbage that is no DNS at all".to_vec(),
            vec![0, 1, 2],
            looped,
            long_q,
        ] {
            s.send_to(&bad, proxy).await.unwrap();
        }
        // A response sent to the proxy (reflection), and a datagram over the query bound.
        let mut resp = Message::from_vec(&query(11, "cart.", RecordType::A)).unwrap();
        resp.set_message_type(hickory_proto::op::MessageType::Response);
        s.send_to(&resp.to_vec().unwrap(), proxy).await.unwrap();
        s.send_to(&vec![0u8; MAX_UDP_QUERY + 1], proxy)
            .await
            .unwrap();
        // Five forwarded queries: two held, three dropped.
        for id in 20..25 {
            s.send_to(&query(id, "slow.example.", RecordType::A), proxy)
                .await
                .unwrap();
        }
        // The proxy still answers a mesh name, at once.
        let a = ask_udp(proxy, &query(30, "cart", RecordType::A))
            .await
            .unwrap();
        assert_eq!(ipv4s(&a), ["10.96.0.20"]);
        assert_eq!(m.dropped_count(DropReason::Malformed), 4);
        assert_eq!(m.dropped_count(DropReason::NotAQuery), 1);
        assert_eq!(m.dropped_count(DropReason::Oversized), 1);
        assert_eq!(m.dropped_count(DropReason::Overloaded), 3);
        // Nothing was sent back to the sender of the junk (no reflection, no amplification).
        let mut buf = [0u8; 512];
        let r = tokio::time::timeout(Duration::from_millis(200), s.recv(&mut buf)).await;
        assert!(r.is_err(), "junk got an answer: {r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn forwarding_failures_are_servfail_and_counted() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (proxy, server) = start(vec![silent.local_addr().unwrap()], DnsConfig::default()).await;
        let mut s = TcpStream::connect(proxy).await.unwrap();
        let q = query(40, "nowhere.example.", RecordType::A);
        s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&q).await.unwrap();
        // Paused time: the 2s deadline passes as soon as everything is idle.
        let n = usize::from(s.read_u16().await.unwrap());
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await.unwrap();
        let a = Message::from_vec(&buf).unwrap();
        assert_eq!(a.response_code(), ResponseCode::ServFail);
        assert_eq!(server.metrics().upstream_failures_total(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn tcp_clients_are_capped_and_idle_ones_disconnected() {
        let cfg = DnsConfig {
            max_tcp_connections: 1,
            ..DnsConfig::default()
        };
        let (proxy, server) = start(vec![], cfg).await;
        let mut first = TcpStream::connect(proxy).await.unwrap();
        // Let the proxy take the first connection before the second arrives.
        tokio::task::yield_now().await;
        let mut second = TcpStream::connect(proxy).await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            second.read(&mut b).await.unwrap_or(0),
            0,
            "over the cap: closed"
        );
        assert_eq!(server.metrics().dropped_count(DropReason::TcpLimit), 1);
        // The first sends nothing: closed after the idle timeout.
        assert_eq!(first.read(&mut b).await.unwrap_or(0), 0);
        assert_eq!(server.metrics().dropped_count(DropReason::TcpIdle), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tcp_client_that_never_reads_is_disconnected_after_the_idle_timeout() {
        let cfg = DnsConfig {
            max_tcp_connections: 1,
            ..DnsConfig::default()
        };
        let (proxy, server) = start(vec![], cfg).await;
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let s = sock.connect(proxy).await.unwrap();
        // Pipelined queries, no reads: the proxy's replies fill both socket buffers and its
        // write blocks.
        let (_r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            let q = query(7, "cart", RecordType::A);
            let mut framed = (q.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&q);
            let batch = framed.repeat(256);
            loop {
                if w.write_all(&batch).await.is_err() {
                    return;
                }
            }
        });
        for _ in 0..60 {
            if server.metrics().dropped_count(DropReason::TcpIdle) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(
            server.metrics().dropped_count(DropReason::TcpIdle),
            1,
            "the blocked write was cut off at the idle timeout"
        );
        // The proxy closed the connection: the writer fails and ends.
        tokio::time::timeout(Duration::from_secs(60), writer)
            .await
            .expect("writer ended")
            .unwrap();
        // And its slot is free again: a new client is served.
        let a = ask_tcp(proxy, &query(8, "cart", RecordType::A)).await;
        assert_eq!(ipv4s(&a), ["10.96.0.20"]);
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_the_listener_ends_its_tcp_connections() {
        let cfg = DnsConfig {
            tcp_idle_timeout: Duration::from_secs(3600),
            ..DnsConfig::default()
        };
        let (proxy, server, stop) = start_stoppable(vec![], cfg).await;
        let mut s = TcpStream::connect(proxy).await.unwrap();
        // Served while the listener runs...
        let q = query(9, "cart", RecordType::A);
        s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&q).await.unwrap();
        let n = usize::from(s.read_u16().await.unwrap());
        s.read_exact(&mut vec![0u8; n]).await.unwrap();
        // ...and closed as soon as it stops, long before the hour-long idle timeout.
        stop.send(true).unwrap();
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("closed on stop");
        assert_eq!(r.unwrap_or(0), 0);
        assert_eq!(server.metrics().dropped_count(DropReason::TcpIdle), 0);
    }
}
