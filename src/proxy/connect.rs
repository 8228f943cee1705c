//! Client-only mesh access (`zmesh-node connect`, docs/capture.md "Client-only access"): the
//! tunnel without capture rules and without root, for VMs and developer machines. Applications
//! reach mesh services through port maps (`connect.forward`) and a SOCKS5 listener
//! (`connect.socks5`); each accepted connection is judged against `connect.allow_from`, its
//! target resolved through the mesh model (a service name becomes its VIP; system DNS is never
//! asked), and then it takes the node's own outbound path (`outbound::proxy_from`): destination
//! selection, the pooled HBONE tunnel with the certificate of `connect.workload`, access log and
//! metrics. Nothing here is privileged: no 15001/15006/15008 listeners, no SO_MARK (the node is
//! built with `Node::new_unprivileged`), no IP_TRANSPARENT, no namespaces.
//!
//! A listener on a LAN address makes this machine a forwarding proxy for agentless hosts on that
//! LAN; `allow_from` says which. A refused source is reset at once (a SOCKS5 client first gets
//! reply 0x02), counted in `zmesh_rejected_total{reason="not_allowed"}` and logged; nothing is
//! dialed for it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::socks5::{self, Destination, Reply, Socks5Error};
use super::{accept_loop, bind, outbound, spawn_control, spawn_renewals, ConnLog, Direction};
use super::{Node, OnOpen, Scope, StartError};
use crate::config::connect::{parse_host, ConnectSettings, Target};
use crate::copy::reset_on_drop;
use crate::model::Model;

/// Why a target cannot be sent anywhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("no service in the mesh is named {0:?} (connect resolves names through the mesh model only, never system DNS)")]
    UnknownHost(String),
    #[error("service {0} has no VIP (headless?): connect needs a VIP for destination selection")]
    NoVip(String),
}

/// The address destination selection is asked about: an address as it is, a service name as
/// its first VIP with the requested port (`Model::select` maps it to a target port).
pub fn resolve(model: &Model, target: &Target) -> Result<SocketAddr, ResolveError> {
    match target {
        Target::Addr(a) => Ok(*a),
        Target::Host { host, port } => {
            let svc = model
                .service_by_host(host)
                .ok_or_else(|| ResolveError::UnknownHost(host.clone()))?;
            let vip = svc
                .vips
                .first()
                .ok_or_else(|| ResolveError::NoVip(svc.key()))?;
            Ok(SocketAddr::new(*vip, *port))
        }
    }
}

/// Listeners of a running `connect`, as bound (port 0 is refused by the config, so these are
/// the configured addresses).
#[derive(Debug, Clone)]
pub struct ConnectBound {
    pub forwards: Vec<SocketAddr>,
    pub socks5: Option<SocketAddr>,
    /// Admin and metrics on 127.0.0.1 at the node's ports; None when those ports were taken
    /// (another node on this machine): connect runs without them.
    pub admin: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
}

/// A running `connect`: its listeners and the switch that stops them.
pub struct Connected {
    pub node: Arc<Node>,
    pub bound: ConnectBound,
    shutdown: watch::Sender<bool>,
    kill: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Connected {
    /// Stops accepting; connections already accepted go on until `super::drain`.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.node.keep_draining(self.kill);
    }
}

/// Binds every listener of `settings` (all or none) and serves them.
pub async fn start(node: Arc<Node>, settings: ConnectSettings) -> Result<Connected, StartError> {
    crate::xds::spawn(&node);
    let settings = Arc::new(settings);
    let mut forwards = Vec::new();
    for f in &settings.forwards {
        forwards.push((bind("connect forward", f.listen, false)?, f.to.clone()));
    }
    let socks = match settings.socks5 {
        Some(a) => Some(bind("SOCKS5", a, false)?),
        None => None,
    };
    let addr = |l: &TcpListener| l.local_addr().expect("bound listener has an address");
    let mut bound = ConnectBound {
        forwards: forwards.iter().map(|(l, _)| addr(l)).collect(),
        socks5: socks.as_ref().map(addr),
        admin: None,
        metrics: None,
    };
    // Operating endpoints on loopback only: this is a workstation, not a node.
    let p = &node.cfg.node.ports;
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    match (
        bind("admin", SocketAddr::new(lo, p.admin), false),
        bind("metrics", SocketAddr::new(lo, p.metrics), false),
    ) {
        (Ok(admin), Ok(metrics)) => {
            bound.admin = Some(addr(&admin));
            bound.metrics = Some(addr(&metrics));
            spawn_control(&node, admin, metrics)?;
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "connect runs without its admin and metrics endpoints");
        }
    }
    let (shutdown, stop) = watch::channel(false);
    let (kill, killed) = watch::channel(false);
    let scope = node.host_scope(killed);
    let mut tasks = Vec::new();
    for (listener, to) in forwards {
        tasks.push(tokio::spawn(serve_forward(
            node.clone(),
            scope.clone(),
            settings.clone(),
            listener,
            to,
            stop.clone(),
        )));
    }
    if let Some(listener) = socks {
        tasks.push(tokio::spawn(serve_socks5(
            node.clone(),
            scope.clone(),
            settings.clone(),
            listener,
            stop.clone(),
        )));
    }
    tasks.push(spawn_renewals(&node, &stop));
    node.ready.store(true, Ordering::Release);
    let forwards: Vec<String> = settings
        .forwards
        .iter()
        .map(|f| format!("{}={}", f.listen, f.to))
        .collect();
    tracing::info!(
        node = %node.cfg.node.name,
        workload = %settings.workload,
        forwards = ?forwards,
        socks5 = ?bound.socks5,
        allow_from = ?settings.allow_from.iter().map(ToString::to_string).collect::<Vec<_>>(),
        admin = ?bound.admin,
        "zmesh connect ready"
    );
    Ok(Connected {
        node,
        bound,
        shutdown,
        kill,
        tasks,
    })
}

/// Refuses a source outside `allow_from`: counted, logged (rate-limited), reset.
fn refuse(node: &Node, listener: &'static str, peer: SocketAddr, tcp: &TcpStream) {
    reset_on_drop(tcp);
    crate::reject!(node.rejections, listener, "not_allowed", src = %peer, "connection refused: source is not in connect.allow_from");
}

async fn serve_forward(
    node: Arc<Node>,
    scope: Arc<Scope>,
    settings: Arc<ConnectSettings>,
    listener: TcpListener,
    to: Target,
    shutdown: watch::Receiver<bool>,
) {
    let counted = node.clone();
    let to = Arc::new(to);
    accept_loop(
        listener,
        shutdown,
        &scope.clone(),
        "connect",
        &counted.rejections,
        move |tcp, peer| {
            let (node, scope, settings, to) =
                (node.clone(), scope.clone(), settings.clone(), to.clone());
            async move {
                if !settings.allows(peer.ip()) {
                    return refuse(&node, "connect", peer, &tcp);
                }
                match resolve(&node.model(), &to) {
                    Ok(dst) => tunnel(node, scope, &settings, tcp, peer, dst, None).await,
                    Err(e) => {
                        reset_on_drop(&tcp);
                        crate::reject!(node.rejections, "connect", "unresolved", src = %peer, target = %to, reason = %e, "connection refused");
                    }
                }
            }
        },
    )
    .await
}

/// Why `dst` is never dialed, if it is not: this host's own loopback, unspecified, link-local,
/// multicast or broadcast addresses and the connect workload's own addresses (a forwarding
/// proxy must not become a way into its own host or its link), and, unless
/// `connect.passthrough` is set, anything the mesh model does not know (connect reaches the
/// mesh; it is no open relay to arbitrary addresses, let alone in plaintext).
fn forbidden(model: &Model, settings: &ConnectSettings, dst: SocketAddr) -> Option<String> {
    let ip = dst.ip().to_canonical();
    let special = match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    };
    if special {
        return Some(format!(
            "{dst} is a loopback, unspecified, link-local, multicast or broadcast address; never dialed"
        ));
    }
    let own = model
        .workload_by_uid(&settings.workload)
        .is_some_and(|w| w.addresses.contains(&ip));
    if own {
        return Some(format!("{dst} is this machine's own address; never dialed"));
    }
    let known = model.service_by_vip(ip).is_some() || model.workload_by_ip(ip).is_some();
    if !known && !settings.passthrough {
        return Some(format!(
            "{dst} is not in the mesh model (connect.passthrough is off); never dialed"
        ));
    }
    None
}

/// Hands an accepted, allowed connection to the node's outbound path, as this machine's
/// workload. `on_open` hears when the tunnel is up (or never will be).
async fn tunnel(
    node: Arc<Node>,
    scope: Arc<Scope>,
    settings: &ConnectSettings,
    tcp: TcpStream,
    client: SocketAddr,
    dst: SocketAddr,
    on_open: Option<OnOpen>,
) {
    let model = node.model();
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    let mut log = ConnLog::new(Direction::Outbound, client, dst, &node.metrics);
    log.on_open = on_open;
    if let Some(why) = forbidden(&model, settings, dst) {
        reset_on_drop(&tcp);
        crate::reject!(node.rejections, "connect", "forbidden_destination", src = %client, %dst, reason = %why, "connection refused");
        log.emit(node.access_log_enabled(), Some(&why));
        return;
    }
    // Looked up per connection: a reload (or xDS) may change or remove the workload, and a
    // connection must never leave without an identity (fail closed).
    let source = match model.workload_by_uid(&settings.workload) {
        Some(w) if w.node == model.node => w.clone(),
        found => {
            reset_on_drop(&tcp);
            let why = match found {
                Some(w) => format!(
                    "connect.workload {:?} now runs on node {:?}, not this one; refused",
                    settings.workload, w.node
                ),
                None => format!(
                    "connect.workload {:?} is not in the mesh model; refused",
                    settings.workload
                ),
            };
            log.emit(node.access_log_enabled(), Some(&why));
            return;
        }
    };
    // The tunnel speaks for the workload: from its address when that is one of this host's
    // (the socket binds it; otherwise the kernel picks), with the client's port.
    let ip = source
        .addresses
        .iter()
        .find(|a| a.is_ipv4() == dst.is_ipv4())
        .or(source.addresses.first())
        .copied()
        .unwrap_or(client.ip());
    let peer = SocketAddr::new(ip, client.port());
    drop(model);
    outbound::proxy_from(node, scope, tcp, peer, source, dst, log).await
}

async fn serve_socks5(
    node: Arc<Node>,
    scope: Arc<Scope>,
    settings: Arc<ConnectSettings>,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) {
    let counted = node.clone();
    accept_loop(
        listener,
        shutdown,
        &scope.clone(),
        "socks5",
        &counted.rejections,
        move |tcp, peer| {
            let (node, scope, settings) = (node.clone(), scope.clone(), settings.clone());
            async move { socks5_connection(node, scope, settings, tcp, peer).await }
        },
    )
    .await
}

/// Why a SOCKS5 negotiation did not produce a request.
#[derive(Debug, thiserror::Error)]
enum NegotiateError {
    #[error(transparent)]
    Protocol(#[from] Socks5Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

async fn socks5_connection(
    node: Arc<Node>,
    scope: Arc<Scope>,
    settings: Arc<ConnectSettings>,
    mut tcp: TcpStream,
    peer: SocketAddr,
) {
    // Before a single byte is read or written: an outsider gets nothing, holds nothing.
    if !settings.allows(peer.ip()) {
        return refuse(&node, "socks5", peer, &tcp);
    }
    let deadline = node.cfg.node.handshake_timeout;
    let dst = match tokio::time::timeout(deadline, negotiate(&mut tcp)).await {
        Ok(Ok(dst)) => dst,
        Err(_) => {
            reset_on_drop(&tcp);
            crate::reject!(node.rejections, "socks5", "socks5_handshake_timeout", src = %peer, ?deadline, "SOCKS5 greeting and request did not arrive within node.handshake_timeout; closed");
            return;
        }
        Ok(Err(NegotiateError::Protocol(e))) => {
            // The reply (if any) is written; close without RST so the client reads it.
            crate::reject!(node.rejections, "socks5", e.code(), src = %peer, reason = %e, "SOCKS5 request refused");
            return;
        }
        Ok(Err(NegotiateError::Io(e))) => {
            crate::reject!(info: node.rejections, "socks5", "socks5_io", src = %peer, error = %e, "SOCKS5 client went away during negotiation");
            return;
        }
    };
    let target = match dst {
        Destination::Addr(a) => Ok(a),
        Destination::Domain { name, port } => match name.parse::<IpAddr>() {
            Ok(ip) => Ok(SocketAddr::new(ip, port)),
            Err(_) => match parse_host(&name) {
                Ok(host) => resolve(&node.model(), &Target::Host { host, port }),
                Err(_) => Err(ResolveError::UnknownHost(name)),
            },
        },
    };
    let dst = match target {
        Ok(dst) => dst,
        Err(e) => {
            let _ = tcp.write_all(&socks5::reply(Reply::HostUnreachable)).await;
            crate::reject!(node.rejections, "socks5", "socks5_unknown_host", src = %peer, reason = %e, "SOCKS5 request refused (host unreachable)");
            return;
        }
    };
    if let Some(why) = forbidden(&node.model(), &settings, dst) {
        let _ = tcp.write_all(&socks5::reply(Reply::NotAllowed)).await;
        crate::reject!(node.rejections, "socks5", "forbidden_destination", src = %peer, %dst, reason = %why, "SOCKS5 request refused (not allowed by ruleset)");
        return;
    }
    // The reply goes out from the outbound path itself, once the tunnel is up (or has failed):
    // through a second descriptor of the same socket, since the path owns the stream.
    let dup = match socket2::SockRef::from(&tcp).try_clone() {
        Ok(s) => s,
        Err(e) => {
            let _ = tcp.write_all(&socks5::reply(Reply::GeneralFailure)).await;
            tracing::warn!(src = %peer, error = %e, "cannot duplicate the SOCKS5 socket; refused");
            return;
        }
    };
    let once = Mutex::new(Some(dup));
    let on_open = OnOpen(Arc::new(move |r| {
        let Some(s) = once.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let code = match r {
            Ok(()) => Reply::Succeeded,
            Err(_) => Reply::ConnectionRefused,
        };
        // Ten bytes on a socket that has sent nothing yet: the send buffer takes them whole.
        if let Err(e) = std::io::Write::write_all(&mut &s, &socks5::reply(code)) {
            tracing::debug!(error = %e, "SOCKS5 reply not written");
        }
    }));
    tunnel(node, scope, &settings, tcp, peer, dst, Some(on_open)).await
}

/// Reads the greeting, answers it, reads the request. Reads exactly what the messages say
/// (never beyond the request: the bytes after it belong to the tunnel). Replies to a protocol
/// error where RFC 1928 has a reply for it.
async fn negotiate(tcp: &mut TcpStream) -> Result<Destination, NegotiateError> {
    let mut buf = [0u8; socks5::MAX_REQUEST];
    let greeting = read_message(tcp, &mut buf, socks5::greeting_len, socks5::parse_greeting).await;
    let reply = match &greeting {
        Ok(_) => socks5::greeting_reply(Ok(())),
        Err(NegotiateError::Protocol(e)) => socks5::greeting_reply(Err(e)),
        Err(NegotiateError::Io(_)) => None,
    };
    if let Some(r) = reply {
        tcp.write_all(&r).await?;
    }
    greeting?;
    let request = read_message(tcp, &mut buf, socks5::request_len, socks5::parse_request).await;
    match request {
        Ok((dst, _)) => Ok(dst),
        Err(NegotiateError::Protocol(e)) => {
            if !matches!(e, Socks5Error::Truncated(_)) {
                tcp.write_all(&socks5::reply(e.reply())).await?;
            }
            Err(e.into())
        }
        Err(e) => Err(e),
    }
}

/// Reads one message: `len` says how many bytes the prefix so far implies, `parse` when it is
/// complete. EOF before the end is `Truncated`.
async fn read_message<T>(
    tcp: &mut TcpStream,
    buf: &mut [u8],
    len: fn(&[u8]) -> usize,
    parse: fn(&[u8]) -> Result<Option<T>, Socks5Error>,
) -> Result<T, NegotiateError> {
    let mut have = 0;
    loop {
        if let Some(done) = parse(&buf[..have])? {
            return Ok(done);
        }
        let want = len(&buf[..have]).min(buf.len());
        debug_assert!(want > have, "an incomplete message needs more bytes");
        while have < want {
            match tcp.read(&mut buf[have..want]).await? {
                0 => return Err(Socks5Error::Truncated(have).into()),
                n => have += n,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        let cfg = crate::config::Config::parse(
            "node: { name: n, certificates: { file_ca: { dir: /nonexistent } } }
workloads:
  - { uid: db, name: db, namespace: data, addresses: [10.0.0.2], node: other, services: { data/pg.data.svc.cluster.local: {} } }
services:
  - { name: pg, namespace: data, hostname: pg.data.svc.cluster.local, vips: [10.96.0.9], ports: { 5432: 5432 } }
  - { name: headless, namespace: data, hostname: headless.data.svc.cluster.local, ports: { 80: 80 } }
",
            "test",
        )
        .unwrap();
        Model::from_config(&cfg)
    }

    #[test]
    fn names_resolve_through_the_model_only() {
        let m = model();
        let host = |h: &str, port| Target::Host {
            host: h.into(),
            port,
        };
        assert_eq!(
            resolve(&m, &host("pg.data.svc.cluster.local", 5432)),
            Ok("10.96.0.9:5432".parse().unwrap())
        );
        assert_eq!(
            resolve(&m, &host("pg.data", 5432)),
            Ok("10.96.0.9:5432".parse().unwrap())
        );
        assert_eq!(
            resolve(&m, &host("localhost", 80)),
            Err(ResolveError::UnknownHost("localhost".into())),
            "never system DNS"
        );
        assert!(matches!(
            resolve(&m, &host("headless.data.svc.cluster.local", 80)),
            Err(ResolveError::NoVip(_))
        ));
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        assert_eq!(resolve(&m, &Target::Addr(a)), Ok(a));
    }
}
