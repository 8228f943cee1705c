//! Tier (b) builder: two or more zmesh nodes in this process, each owning loopback addresses
//! 127.<net>.0.<host>, with a file CA in a temp dir. `net` must be unique per test so tests can
//! run in parallel without their listeners colliding.

#![allow(dead_code)]

pub mod http_app;
pub mod istiod;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use zmesh::config::Config;
use zmesh::identity::{CertManager, CertSource, FileCa, SpiffeId, WorkloadCert};
use zmesh::proxy::{self, Node, Running};

pub fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net, 0, host))
}

/// One workload in the shared model.
#[derive(Clone, Copy)]
pub struct W {
    pub uid: &'static str,
    pub sa: &'static str,
    pub host: u8,
    pub node: &'static str,
}

pub struct Mesh {
    pub net: u8,
    pub dir: tempfile::TempDir,
    pub ca_dir: PathBuf,
    pub nodes: Vec<Running>,
}

pub fn workloads_yaml(net: u8, ws: &[W]) -> String {
    let mut y = String::from("workloads:\n");
    for w in ws {
        y += &format!(
            "  - {{ uid: {uid}, name: {uid}, namespace: default, service_account: {sa}, addresses: [{ip}], node: {node} }}\n",
            uid = w.uid,
            sa = w.sa,
            ip = ip(net, w.host),
            node = w.node
        );
    }
    y
}

/// The usual pair: `client` (service account `client`) at .2 on node-a and `server` at .3 on
/// node-b, whose service account is `server_sa`, plus any `extra` workloads.
pub fn client_server_workloads(net: u8, server_sa: &'static str, extra: &[W]) -> String {
    let mut ws = vec![
        W {
            uid: "client",
            sa: "client",
            host: 2,
            node: "node-a",
        },
        W {
            uid: "server",
            sa: server_sa,
            host: 3,
            node: "node-b",
        },
    ];
    ws.extend_from_slice(extra);
    workloads_yaml(net, &ws)
}

pub fn node_yaml(
    net: u8,
    name: &str,
    host: u8,
    ca_dir: &std::path::Path,
    workloads: &str,
) -> String {
    node_yaml_with(net, name, host, ca_dir, "", workloads)
}

/// `node_yaml` with extra `node:` settings (each line indented by two spaces).
pub fn node_yaml_with(
    net: u8,
    name: &str,
    host: u8,
    ca_dir: &std::path::Path,
    extra_node: &str,
    rest: &str,
) -> String {
    format!(
        "node:\n  name: {name}\n  bind: {bind}\n  access_log: text\n{extra_node}  certificates:\n    file_ca: {{ dir: {ca} }}\n{rest}",
        bind = ip(net, host),
        ca = ca_dir.display()
    )
}

/// How often tests' config watchers look at their files.
pub const TEST_WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Replaces a file the way editors and ConfigMaps do: write beside, rename over.
pub fn rewrite(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `limit`.
pub async fn wait_until(what: &str, limit: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

impl Mesh {
    pub fn new(net: u8) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        FileCa::init(&ca_dir, "cluster.local").unwrap();
        Mesh {
            net,
            dir,
            ca_dir,
            nodes: Vec::new(),
        }
    }

    /// Starts a node named `name` listening on 127.<net>.0.<host>, with `workloads_yaml`.
    pub async fn node(&mut self, name: &str, host: u8, workloads: &str) -> Arc<Node> {
        let text = node_yaml(self.net, name, host, &self.ca_dir, workloads);
        let cfg = Config::parse(&text, name).unwrap();
        let node = Node::new(cfg).unwrap();
        let running = proxy::start(node.clone()).await.unwrap();
        self.nodes.push(running);
        node
    }

    /// Starts a node from a config file written to the mesh's temp dir, with a watcher that
    /// reloads it on change. Returns the node and the file's path.
    pub async fn node_from_file(&mut self, name: &str, text: &str) -> (Arc<Node>, PathBuf) {
        let path = self.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, text).unwrap();
        let loaded = proxy::reload::stamp(&path);
        let cfg = Config::load(&path).unwrap();
        let node = Node::new(cfg).unwrap();
        self.start(node.clone()).await;
        tokio::spawn(proxy::reload::watch(
            node.clone(),
            path.clone(),
            loaded,
            TEST_WATCH_INTERVAL,
            Arc::new(tokio::sync::Notify::new()),
        ));
        (node, path)
    }

    /// Starts a node whose certificates come from `certs` (a stepped clock, a failing CA).
    pub async fn node_with_certs(
        &mut self,
        name: &str,
        host: u8,
        workloads: &str,
        certs: Arc<CertManager>,
    ) -> Arc<Node> {
        let text = node_yaml(self.net, name, host, &self.ca_dir, workloads);
        let node = Node::with_certs(Config::parse(&text, name).unwrap(), certs).unwrap();
        self.start(node.clone()).await;
        node
    }

    async fn start(&mut self, node: Arc<Node>) {
        let running = proxy::start(node).await.unwrap();
        self.nodes.push(running);
    }

    /// A certificate for `id` from this mesh's CA (a client outside any node).
    pub fn cert(&self, id: &SpiffeId) -> (Arc<WorkloadCert>, Arc<CertManager>) {
        cert_from(&self.ca_dir, id)
    }
}

pub fn cert_from(ca_dir: &std::path::Path, id: &SpiffeId) -> (Arc<WorkloadCert>, Arc<CertManager>) {
    let ca = FileCa::load(ca_dir).unwrap();
    let roots = ca.roots().to_vec();
    let mgr = Arc::new(
        CertManager::new(
            CertSource::file_ca(ca, std::time::Duration::from_secs(3600)),
            &roots,
            zmesh::tls::provider(),
        )
        .unwrap(),
    );
    (mgr.fetch(id).unwrap(), mgr)
}

/// Stands in for capture: accepts on the source workload's address and hands each connection to
/// the node's outbound proxy with `dst` as its original destination (what SO_ORIGINAL_DST would
/// say after a REDIRECT). Returns the address apps should connect to.
pub async fn capture_to(node: Arc<Node>, listen: IpAddr, dst: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind(SocketAddr::new(listen, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            // The app's own address is the source the node sees, as after a REDIRECT.
            let peer = SocketAddr::new(listen, tcp.peer_addr().unwrap().port());
            tokio::spawn(proxy::outbound::proxy(node.clone(), tcp, peer, dst));
        }
    });
    addr
}

/// Connects from `src` (bound) to `to`.
pub async fn connect_from(src: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src, 0))?;
    s.connect(to).await
}

pub fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

/// An app that echoes every connection back and half-closes when its client does.
pub fn spawn_echo(app: TcpListener) {
    use tokio::io::AsyncWriteExt;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = app.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

/// Writes `data` then half-closes, while reading everything the other side sends until EOF.
pub async fn exchange(c: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut r, mut w) = c.split();
    let send = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    tokio::join!(send, recv).1
}

/// TLS + HTTP/2 to `addr` presenting `client` (from `ca_dir`) and expecting `server`.
pub async fn hbone(
    ca_dir: &std::path::Path,
    client: &SpiffeId,
    server: &SpiffeId,
    addr: SocketAddr,
) -> Result<h2::client::SendRequest<bytes::Bytes>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    hbone_over(tcp, ca_dir, client, server).await
}

/// `hbone` over a TCP connection made by the caller (in another namespace, say).
pub async fn hbone_over(
    tcp: TcpStream,
    ca_dir: &std::path::Path,
    client: &SpiffeId,
    server: &SpiffeId,
) -> Result<h2::client::SendRequest<bytes::Bytes>, String> {
    let (cert, mgr) = cert_from(ca_dir, client);
    hbone_with(tcp, &cert, &mgr, server).await
}

/// `hbone_over` presenting a certificate the caller holds (to revoke it later, say); `mgr`
/// supplies the trust. The client trusts the real mesh CA even when it presents a foreign
/// certificate.
pub async fn hbone_with(
    tcp: TcpStream,
    cert: &WorkloadCert,
    mgr: &CertManager,
    server: &SpiffeId,
) -> Result<h2::client::SendRequest<bytes::Bytes>, String> {
    hbone_with_io(tcp, cert, mgr, server).await
}

/// `hbone_with` over any transport (the stream of an outer HBONE tunnel, say).
pub async fn hbone_with_io<IO>(
    tcp: IO,
    cert: &WorkloadCert,
    mgr: &CertManager,
    server: &SpiffeId,
) -> Result<h2::client::SendRequest<bytes::Bytes>, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let cfg = zmesh::tls::client_config(cert, &mgr.trust(), vec![server.clone()])
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(zmesh::tls::placeholder_server_name(), tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (send, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(conn);
    send.ready().await.map_err(|e| format!("h2 ready: {e}"))
}

/// A rapid-reset flood (reliability #7): up to `n` CONNECTs to `target`, each reset at once.
/// Returns how many were sent and the error that ended the connection, if one did.
pub async fn reset_flood(
    mut send: h2::client::SendRequest<bytes::Bytes>,
    target: &str,
    n: usize,
) -> (usize, Option<h2::Error>) {
    let mut sent = 0;
    // On a loaded machine the client may get all `n` out before the server has read them; the
    // close the server owes then comes later: keep resetting, slowly, until it does (or 10 s).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while sent < n || tokio::time::Instant::now() < deadline {
        if sent >= n {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        send = match send.clone().ready().await {
            Ok(r) => r,
            Err(e) => return (sent, Some(e)),
        };
        match send.send_request(connect_req(target), false) {
            Ok((_resp, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(e) => return (sent, Some(e)),
        }
        sent += 1;
    }
    (sent, None)
}

/// The slow form of rapid reset, which h2's own pending-reset limit cannot see: each CONNECT is
/// reset only after its 200, so every one cost a dial. Returns how many got their 200 and the
/// error that ended the connection, if one did.
pub async fn reset_after_200(
    send: h2::client::SendRequest<bytes::Bytes>,
    target: &str,
    n: usize,
) -> (usize, Option<h2::Error>) {
    reset_after_sending(send, target, n, b"").await
}

/// `reset_after_200`, sending `first` on each stream before resetting it: a byte, to look like
/// a tunnel that carried data, or an HTTP request, to make a waypoint open an upstream.
pub async fn reset_after_sending(
    mut send: h2::client::SendRequest<bytes::Bytes>,
    target: &str,
    n: usize,
    first: &'static [u8],
) -> (usize, Option<h2::Error>) {
    for answered in 0..n {
        let (resp, mut stream) = match send.send_request(connect_req(target), false) {
            Ok(r) => r,
            Err(e) => return (answered, Some(e)),
        };
        match resp.await {
            Ok(r) => assert_eq!(r.status(), http::StatusCode::OK),
            Err(e) => return (answered, Some(e)),
        }
        if !first.is_empty() {
            if let Err(e) = stream.send_data(bytes::Bytes::from_static(first), false) {
                return (answered, Some(e));
            }
            // Let the bytes reach the far side before the reset does.
            tokio::task::yield_now().await;
        }
        stream.send_reset(h2::Reason::CANCEL);
    }
    (n, None)
}

/// The most dials one connection may cause while resetting streams for `elapsed`: the
/// in-flight cap, the reset budget and what the budget refilled meanwhile.
pub fn reset_dial_bound(elapsed: std::time::Duration) -> usize {
    use zmesh::hbone::server::{EARLY_RESET_BUDGET, EARLY_RESET_REFILL, MAX_INFLIGHT_DIALS};
    let refill = (elapsed.as_secs_f64() / EARLY_RESET_REFILL.as_secs_f64()).ceil() as usize;
    MAX_INFLIGHT_DIALS + EARLY_RESET_BUDGET as usize + refill
}

/// Runs `flood` (connecting included) and checks what reliability #7 asks: the dials it caused,
/// as the app counted them in `dials`, stay under `reset_dial_bound`, and the connection was
/// closed. Returns the error that closed it.
pub async fn assert_flood_bounded(
    what: &str,
    dials: &std::sync::atomic::AtomicUsize,
    flood: impl std::future::Future<Output = (usize, Option<h2::Error>)>,
) -> h2::Error {
    use std::sync::atomic::Ordering::SeqCst;
    let before = dials.load(SeqCst);
    let start = std::time::Instant::now();
    let (streams, ended) = flood.await;
    // Dials already started land within a moment; then the count is final.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let caused = dials.load(SeqCst) - before;
    let bound = reset_dial_bound(start.elapsed());
    eprintln!("{what}: {streams} streams, {caused} dials (bound {bound}), ended: {ended:?}");
    assert!(
        caused <= bound,
        "{what}: {streams} streams caused {caused} dials (bound {bound})"
    );
    ended.unwrap_or_else(|| {
        panic!("{what}: {streams} streams and the connection was never closed ({caused} dials)")
    })
}

pub async fn status(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    req: http::Request<()>,
) -> Result<http::StatusCode, String> {
    let (resp, _stream) = send.send_request(req, false).map_err(|e| e.to_string())?;
    resp.await.map(|r| r.status()).map_err(|e| e.to_string())
}

pub fn connect_req(authority: &str) -> http::Request<()> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap()
}

/// How long a test waits for a connection to be cut.
pub const CUT_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Sends `msg` and reads the echo: proof the tunnel is open end to end.
pub async fn round_trip(c: &mut TcpStream, msg: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    c.write_all(msg).await.unwrap();
    let mut got = vec![0; msg.len()];
    tokio::time::timeout(std::time::Duration::from_secs(10), c.read_exact(&mut got))
        .await
        .expect("echo within 10 s")
        .expect("echo arrives");
    assert_eq!(got, msg);
}

/// Waits for the app's connection to be cut, and says how: the app must see a reset, never a
/// clean end of stream that would pass for a complete reply.
pub async fn assert_cut(c: &mut TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(CUT_WITHIN, c.read(&mut buf)).await {
        Err(_) => panic!("still open after {CUT_WITHIN:?}"),
        Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(Ok(n)) => panic!("ended with {n} bytes instead of a reset"),
    }
}

/// A new connection from `src` to `entry` is refused: reset at connect, on the first write or
/// on the first read (a reset reported by the write leaves the read a plain EOF).
pub async fn assert_refused(src: IpAddr, entry: SocketAddr) {
    use tokio::io::AsyncWriteExt;
    let reset = std::io::ErrorKind::ConnectionReset;
    let mut c = match connect_from(src, entry).await {
        Ok(c) => c,
        Err(e) => return assert_eq!(e.kind(), reset, "{e}"),
    };
    if let Err(e) = c.write_all(b"anyone?").await {
        return assert_eq!(e.kind(), reset, "{e}");
    }
    assert_cut(&mut c).await;
}

/// The number on the `key value [unit]` line of a `/debug/memory` report (the allocator's
/// counters are bytes, the kernel's lines kB); panics, showing the report, when there is none.
pub fn memory_value(report: &str, key: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no {key}: {report}"))
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
