//! Tier (b) TLS-level tests against a node's :15008 and from its HBONE client (reliability
//! #14, #18, #19, #20): certificates outside their validity on either side, TLS 1.2, no client
//! certificate, ALPN without h2, and hostile handshakes. Each case asserts what the peer saw
//! (the alert), what the node counted and logged (the reason), that nothing was dialed, and,
//! for the hostile ones, that nothing leaked and a good client is still served.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use http::StatusCode;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{AlertDescription, ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use zmesh::identity::{FileCa, SpiffeId};
use zmesh::proxy::Node;

// ---------------------------------------------------------------------------------------------
// Log capture: every test of this file shares one process-wide subscriber; each test looks only
// at lines naming its own addresses (its `net` is unique).

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let sink = Captured::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber per process");
        sink
    })
}

/// The captured log lines that contain every one of `needles`.
fn log_lines(needles: &[&str]) -> Vec<String> {
    let text = String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned();
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Clients the real HBONE client would never be: any TLS version, any ALPN, any certificate.

/// Accepts any server certificate: these tests judge the server, not the client's checks.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client certificate chain and its key.
struct ClientCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// A certificate for `id` from the mesh CA, as if issued at `issued_at` for `ttl` (the CA
/// backdates `not_before` by five minutes).
fn cert_issued_at(mesh: &Mesh, id: &SpiffeId, issued_at: SystemTime, ttl: Duration) -> ClientCert {
    let issued = FileCa::load(&mesh.ca_dir)
        .unwrap()
        .issue_at(id, ttl, issued_at)
        .unwrap();
    ClientCert {
        chain: issued.chain,
        key: issued.key,
    }
}

fn valid_cert(mesh: &Mesh, sa: &str) -> ClientCert {
    cert_issued_at(mesh, &id(sa), SystemTime::now(), Duration::from_secs(3600))
}

const HOUR: Duration = Duration::from_secs(3600);

/// Expired an hour ago (issued two hours ago for one hour).
fn expired_cert(mesh: &Mesh, sa: &str) -> ClientCert {
    cert_issued_at(mesh, &id(sa), SystemTime::now() - 2 * HOUR, HOUR)
}

/// Valid from 55 minutes from now (issued "in an hour", backdated five minutes).
fn future_cert(mesh: &Mesh, sa: &str) -> ClientCert {
    cert_issued_at(mesh, &id(sa), SystemTime::now() + HOUR, HOUR)
}

/// A client config: `provider` and `versions`, presenting `cert` (or none), offering `alpn`.
fn client_cfg(
    provider: Arc<CryptoProvider>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    cert: Option<ClientCert>,
    alpn: &[&[u8]],
) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut cfg = match cert {
        Some(c) => builder.with_client_auth_cert(c.chain, c.key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

/// What HBONE's client sends, but with `cert` presented.
fn tls13_h2(cert: Option<ClientCert>) -> ClientConfig {
    client_cfg(
        zmesh::tls::provider(),
        &[&rustls::version::TLS13],
        cert,
        &[b"h2"],
    )
}

/// What a client saw of the server.
#[derive(Debug, PartialEq)]
enum Seen {
    /// The server answered the HTTP/2 preface with bytes of its own (its SETTINGS): served.
    Served,
    /// A fatal TLS alert from the server, in the handshake or on the first read.
    Alert(AlertDescription),
    /// Another TLS error on the client's side.
    Tls(String),
    /// The connection ended with this I/O error kind and no TLS alert.
    Io(std::io::ErrorKind),
    /// A clean end of stream.
    Eof,
}

fn seen_io(e: &std::io::Error) -> Seen {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(a)) => Seen::Alert(*a),
        Some(other) => Seen::Tls(other.to_string()),
        None => Seen::Io(e.kind()),
    }
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame, completing the client preface.
const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// A full HEADERS frame (stream 1, END_HEADERS) for `CONNECT <authority>`: HPACK literals
/// without indexing, `:method` by static name index 2, `:authority` by static name index 1.
fn connect_frame(authority: &str) -> Vec<u8> {
    let mut block = vec![0x02, 7];
    block.extend_from_slice(b"CONNECT");
    block.push(0x01);
    block.push(authority.len() as u8);
    block.extend_from_slice(authority.as_bytes());
    let len = block.len() as u32;
    let mut f = vec![
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        1,
        0x4,
        0,
        0,
        0,
        1,
    ];
    f.extend_from_slice(&block);
    f
}

/// Handshakes with `cfg` over `io`, then sends the HTTP/2 preface and a CONNECT to
/// `authority` and reads: TLS 1.3 servers judge the client certificate after the client's
/// Finished, so a rejection may only show on that first read.
async fn probe_over<IO>(io: IO, cfg: ClientConfig, authority: &str) -> Seen
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut tls = match TlsConnector::from(Arc::new(cfg))
        .connect(zmesh::tls::placeholder_server_name(), io)
        .await
    {
        Ok(t) => t,
        Err(e) => return seen_io(&e),
    };
    let mut first = PREFACE.to_vec();
    first.extend_from_slice(SETTINGS);
    first.extend_from_slice(&connect_frame(authority));
    if let Err(e) = async {
        tls.write_all(&first).await?;
        tls.flush().await
    }
    .await
    {
        return seen_io(&e);
    }
    let mut buf = [0u8; 512];
    match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
        Err(_) => panic!("the server neither answered nor closed within 10 s"),
        Ok(Ok(0)) => Seen::Eof,
        Ok(Ok(_)) => Seen::Served,
        Ok(Err(e)) => seen_io(&e),
    }
}

async fn probe(addr: SocketAddr, cfg: ClientConfig, authority: &str) -> Seen {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    probe_over(tcp, cfg, authority).await
}

// ---------------------------------------------------------------------------------------------
// The node under test and what it dialed.

/// Accepts every connection to `listener` and counts it.
fn count_accepts(listener: TcpListener) -> Arc<std::sync::atomic::AtomicUsize> {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = n.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(s);
        }
    });
    n
}

struct Under {
    mesh: Mesh,
    node: Arc<Node>,
    /// The node's HBONE listener for the server workload.
    hb: SocketAddr,
    /// The server app's address (a CONNECT target), and how often it was dialed.
    app: SocketAddr,
    dials: Arc<std::sync::atomic::AtomicUsize>,
}

impl Under {
    fn dials(&self) -> usize {
        self.dials.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn rejected(&self, reason: &'static str) -> u64 {
        self.node.rejections.count("hbone", reason)
    }

    /// The real HBONE client with a good certificate still gets a 200 for a CONNECT.
    async fn assert_good_client_served(&self) {
        let before = self.dials();
        let mut send = hbone(&self.mesh.ca_dir, &id("client"), &id("server"), self.hb)
            .await
            .expect("a good client completes the handshake");
        assert_eq!(
            status(&mut send, connect_req(&self.app.to_string())).await,
            Ok(StatusCode::OK)
        );
        // The node answers 200 only once its dial succeeded; the app's accept loop counts it
        // a moment later. At least one: a probe just before may have left a CONNECT that the
        // node dials after the probe read its SETTINGS and went (or never dials).
        wait_until("the good CONNECT's dial", Duration::from_secs(5), || {
            self.dials() > before
        })
        .await;
    }

    /// Waits long enough for a dial that must not happen, then checks it did not.
    async fn assert_nothing_dialed(&self, before: usize, what: &str) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(self.dials(), before, "{what}: the node dialed the app");
    }

    /// `zmesh_rejected_total{listener="hbone",reason}` as served on :15020 equals `n`, and
    /// a WARN line with that `reason_code` names `text` (the operator-facing reason). Both are
    /// awaited: the node counts, then logs, after it closed the socket the client watched.
    async fn assert_rejected(&self, reason: &'static str, n: u64, text: &str) {
        let dst = self.hb.ip().to_string();
        let code = format!("reason_code=\"{reason}\"");
        let logged = || {
            log_lines(&["HBONE connection rejected", &dst, &code])
                .into_iter()
                .filter(|l| l.contains("WARN") && l.contains(text))
                .count()
        };
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        while (self.rejected(reason) < n || logged() == 0) && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(self.rejected(reason), n, "rejections for {reason}");
        let series = format!("zmesh_rejected_total{{listener=\"hbone\",reason=\"{reason}\"}} {n}");
        assert!(
            self.node.metrics_text().contains(&series),
            "metrics lack {series}"
        );
        assert!(
            logged() > 0,
            "no WARN line for {reason} naming {text:?}: {:#?}",
            log_lines(&["HBONE connection rejected", &dst])
        );
    }
}

/// Node B owns the server workload at 127.<net>.0.3; its app listens on :8080.
async fn under(net: u8, extra_node: &str) -> Under {
    logs();
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    let text = node_yaml_with(net, "node-b", 3, &mesh.ca_dir, extra_node, &w);
    let (node, _) = mesh.node_from_file("node-b", &text).await;
    let app = SocketAddr::new(ip(net, 3), 8080);
    let dials = count_accepts(TcpListener::bind(app).await.unwrap());
    Under {
        mesh,
        node,
        hb: SocketAddr::new(ip(net, 3), 15008),
        app,
        dials,
    }
}

// ---------------------------------------------------------------------------------------------
// Reliability #14 (inbound): a client certificate outside its validity.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_not_yet_valid_client_certificates_are_refused_naming_the_reason() {
    let u = under(171, "").await;
    let target = u.app.to_string();
    let before = u.dials();

    let expired = probe(
        u.hb,
        tls13_h2(Some(expired_cert(&u.mesh, "client"))),
        &target,
    )
    .await;
    assert_eq!(expired, Seen::Alert(AlertDescription::CertificateExpired));
    u.assert_rejected("peer_cert_expired", 1, "Expired").await;

    let future = probe(
        u.hb,
        tls13_h2(Some(future_cert(&u.mesh, "client"))),
        &target,
    )
    .await;
    // RFC 8446 §6.2: certificate_expired also means "not currently valid".
    assert_eq!(future, Seen::Alert(AlertDescription::CertificateExpired));
    u.assert_rejected("peer_cert_not_yet_valid", 1, "NotValidYet")
        .await;

    // Neither refused client got anything dialed; the control, the same client with a
    // current certificate, is served (and its dial counted, so a dial above would have been).
    u.assert_nothing_dialed(before, "certificate validity")
        .await;
    let fresh = probe(u.hb, tls13_h2(Some(valid_cert(&u.mesh, "client"))), &target).await;
    assert_eq!(fresh, Seen::Served);
    u.assert_good_client_served().await;
}

// ---------------------------------------------------------------------------------------------
// Reliability #14 (outbound): the node's HBONE client facing a server certificate outside its
// validity. The tunnel fails naming the reason; the app sees a reset; nothing goes in plaintext.

/// What a fake HBONE server saw of each connection: how its TLS handshake ended.
#[derive(Default)]
struct FakeServer {
    handshakes: Mutex<Vec<Result<(), String>>>,
    /// Bytes read after a completed handshake (application data): must stay empty.
    app_bytes: Mutex<Vec<u8>>,
}

/// A TLS 1.3, ALPN h2 server at `addr` presenting `cert` (no client certificate asked for).
async fn fake_hbone_server(addr: SocketAddr, cert: ClientCert) -> Arc<FakeServer> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(zmesh::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(cert.chain, cert.key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind(addr).await.unwrap();
    let seen = Arc::new(FakeServer::default());
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let record = record.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Err(e) => record.handshakes.lock().unwrap().push(Err(e.to_string())),
                    Ok(mut tls) => {
                        record.handshakes.lock().unwrap().push(Ok(()));
                        let mut buf = [0u8; 4096];
                        while let Ok(n @ 1..) = tls.read(&mut buf).await {
                            record
                                .app_bytes
                                .lock()
                                .unwrap()
                                .extend_from_slice(&buf[..n]);
                        }
                    }
                }
            });
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_refuses_an_expired_or_not_yet_valid_server_certificate() {
    logs();
    for (net, which, alert, reason) in [
        (172u8, "expired", "CertificateExpired", "Expired"),
        (173u8, "not yet valid", "CertificateExpired", "NotValidYet"),
    ] {
        let mut mesh = Mesh::new(net);
        let a = mesh
            .node("node-a", 2, &client_server_workloads(net, "server", &[]))
            .await;
        // Node B is not running: a server with the right identity but a bad validity stands at
        // its HBONE address, and a plain listener at the app's address would see any fallback.
        let cert = if which == "expired" {
            expired_cert(&mesh, "server")
        } else {
            future_cert(&mesh, "server")
        };
        let fake = fake_hbone_server(SocketAddr::new(ip(net, 3), 15008), cert).await;
        let app = SocketAddr::new(ip(net, 3), 8080);
        let plain = count_accepts(TcpListener::bind(app).await.unwrap());
        let entry = capture_to(a.clone(), ip(net, 2), app).await;

        let r = async {
            let mut c = connect_from(ip(net, 2), entry).await?;
            c.write_all(b"secret plaintext").await?;
            let mut buf = [0u8; 16];
            c.read(&mut buf).await
        }
        .await;
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{which}: the app must see a reset, got {r:?}"
        );
        // The server saw one handshake, ended by the client's alert naming the reason; no
        // application byte, no second attempt, nothing at the app's address.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let handshakes = fake.handshakes.lock().unwrap().clone();
        assert_eq!(handshakes.len(), 1, "{which}: {handshakes:?}");
        let err = handshakes[0].as_ref().expect_err("the handshake must fail");
        assert!(err.contains(alert), "{which}: {err}");
        assert!(fake.app_bytes.lock().unwrap().is_empty(), "{which}");
        assert_eq!(
            plain.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "{which}: plaintext fallback"
        );
        // The node's access line names the peer and the reason.
        let hb = format!("{}:15008", ip(net, 3));
        let lines = log_lines(&["connection complete", &hb, "error"]);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("TLS handshake with") && l.contains(reason)),
            "{which}: no access line naming the TLS failure {reason}: {lines:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Reliability #18: TLS 1.2 only.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls12_only_client_gets_protocol_version_and_no_http2() {
    let u = under(174, "").await;
    let before = u.dials();
    // The full ring provider: it has the TLS 1.2 suites zmesh's provider leaves out.
    let cfg = client_cfg(
        Arc::new(rustls::crypto::ring::default_provider()),
        &[&rustls::version::TLS12],
        Some(valid_cert(&u.mesh, "client")),
        &[b"h2"],
    );
    let seen = probe(u.hb, cfg, &u.app.to_string()).await;
    assert_eq!(seen, Seen::Alert(AlertDescription::ProtocolVersion));
    u.assert_rejected("tls_version", 1, "peer is incompatible")
        .await;
    u.assert_nothing_dialed(before, "TLS 1.2").await;
    u.assert_good_client_served().await;
}

// ---------------------------------------------------------------------------------------------
// Reliability #19: no client certificate; ALPN without h2; no ALPN at all.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_certificate_is_certificate_required() {
    let u = under(175, "").await;
    let before = u.dials();
    let seen = probe(u.hb, tls13_h2(None), &u.app.to_string()).await;
    assert_eq!(seen, Seen::Alert(AlertDescription::CertificateRequired));
    u.assert_rejected("client_identity", 1, "no certificates")
        .await;
    u.assert_nothing_dialed(before, "no client certificate")
        .await;
    u.assert_good_client_served().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_without_h2_is_no_application_protocol_and_no_alpn_is_closed_before_http2() {
    let u = under(176, "").await;
    let before = u.dials();
    let target = u.app.to_string();
    let cfg = |alpn: &[&[u8]]| {
        client_cfg(
            zmesh::tls::provider(),
            &[&rustls::version::TLS13],
            Some(valid_cert(&u.mesh, "client")),
            alpn,
        )
    };

    // Offering only http/1.1: refused inside the handshake.
    let seen = probe(u.hb, cfg(&[b"http/1.1"]), &target).await;
    assert_eq!(seen, Seen::Alert(AlertDescription::NoApplicationProtocol));
    u.assert_rejected("alpn", 1, "support any known protocol")
        .await;

    // Offering no ALPN at all: rustls' server completes TLS (it only refuses an ALPN list
    // without h2), then zmesh closes the connection without reading a byte of HTTP/2: the
    // CONNECT the client sent right after its Finished is never processed. The close is a FIN
    // if the node's last read took the CONNECT in with the handshake (its 64 KiB read-ahead
    // usually does), a RST if the CONNECT arrived after it and lay unread; either way no
    // HTTP/2 answer, and the rejection and zero dials are asserted below.
    let seen = probe(u.hb, cfg(&[]), &target).await;
    assert!(
        matches!(
            seen,
            Seen::Io(std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset)
        ),
        "no ALPN: {seen:?}"
    );
    u.assert_rejected("alpn", 2, "did not negotiate ALPN h2")
        .await;

    u.assert_nothing_dialed(before, "ALPN").await;
    u.assert_good_client_served().await;
}

// ---------------------------------------------------------------------------------------------
// Reliability #20: hostile handshakes. After each: no socket of this node's HBONE port left
// open in this process, the runtime's task count back to where it was, and a good client
// served.

/// The fds this process holds for TCP connections to or from `addr` (either end), with their
/// state (/proc/net/tcp): a connection the node failed to close stays here.
fn fds_on(addr: SocketAddr) -> Vec<String> {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    let o = v4.ip().octets();
    let hex = format!(
        "{:02X}{:02X}{:02X}{:02X}:{:04X}",
        o[3],
        o[2],
        o[1],
        o[0],
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let inodes: std::collections::HashMap<String, String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote, state, inode) = (f[1], f[2], f[3], f[9]);
            ((local == hex || remote == hex) && state != "0A").then(|| {
                (
                    inode.to_string(),
                    format!("{local}->{remote} state {state}"),
                )
            })
        })
        .collect();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            let inode = t.strip_prefix("socket:[")?.strip_suffix(']')?;
            inodes.get(inode).cloned()
        })
        .collect()
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// After a hostile case: the node closed its side, its tasks ended, and it serves.
async fn assert_recovered(u: &Under, tasks: usize, what: &str) {
    let limit = Duration::from_secs(5);
    let end = tokio::time::Instant::now() + limit;
    while !fds_on(u.hb).is_empty() || alive_tasks() > tasks {
        assert!(
            tokio::time::Instant::now() < end,
            "{what}: after {limit:?} still {:?} open on {} and {} tasks (was {tasks})",
            fds_on(u.hb),
            u.hb,
            alive_tasks()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    u.assert_good_client_served().await;
    // The good client's connection is gone again (the h2 client ended with its runtime task).
}

/// Writes at most one byte per write, each flushed as its own TCP segment (NODELAY), with
/// `pause` between bytes.
struct Dribble {
    tcp: TcpStream,
    pause: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for Dribble {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Dribble {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(s) = self.sleep.as_mut() {
            std::task::ready!(s.as_mut().poll(cx));
            self.sleep = None;
        }
        let n =
            std::task::ready!(Pin::new(&mut self.tcp).poll_write(cx, &buf[..buf.len().min(1)]))?;
        if !self.pause.is_zero() {
            self.sleep = Some(Box::pin(tokio::time::sleep(self.pause)));
        }
        Poll::Ready(Ok(n))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

use std::future::Future as _;

async fn dribble(addr: SocketAddr, pause: Duration) -> Dribble {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    Dribble {
        tcp,
        pause,
        sleep: None,
    }
}

/// The bytes of a real HBONE ClientHello (what the client's first flight would be).
fn client_hello(mesh: &Mesh) -> Vec<u8> {
    let cfg = tls13_h2(Some(valid_cert(mesh, "client")));
    let mut conn =
        rustls::ClientConnection::new(Arc::new(cfg), zmesh::tls::placeholder_server_name())
            .unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    hello
}

/// Reads until the server closes; returns how long that took and how it ended.
async fn until_closed(tcp: &mut TcpStream, limit: Duration) -> (Duration, String) {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(limit, tcp.read(&mut buf)).await {
            Err(_) => panic!("the server kept the connection open for {limit:?}"),
            Ok(Ok(0)) => return (start.elapsed(), format!("EOF after {} bytes", got.len())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => {
                return (
                    start.elapsed(),
                    format!("{:?} after {} bytes", e.kind(), got.len()),
                )
            }
        }
    }
}

/// `n` CA certificates that all share the subject (and issuer) "hostile", each with its own
/// key, and a leaf for `id` "issued" by that name: every intermediate looks like every other
/// one's issuer, the worst case for path building. Nothing in it chains to the mesh root.
fn hostile_chain(id: &SpiffeId, n: usize) -> ClientCert {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        SanType,
    };
    let ca = || {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "hostile");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p
    };
    let mut chain = Vec::new();
    let mut issuer = None;
    for _ in 0..n {
        let key = KeyPair::generate().unwrap();
        let cert = ca().self_signed(&key).unwrap();
        chain.push(cert.der().clone());
        issuer = Some((cert, key));
    }
    let (issuer, issuer_key) = issuer.unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = p.signed_by(&leaf_key, &issuer, &issuer_key).unwrap();
    chain.insert(0, leaf.der().clone());
    ClientCert {
        chain,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    }
}

/// The handshake deadline of the node under the hostile tests.
const DEADLINE: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_handshakes_are_bounded_closed_and_leak_nothing() {
    let u = under(177, "  handshake_timeout: 2s\n").await;
    let target = u.app.to_string();
    u.assert_good_client_served().await;
    // The good client's connection and its node-side tasks are gone before the baseline.
    wait_until(
        "the warm-up connection to close",
        Duration::from_secs(5),
        || fds_on(u.hb).is_empty(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let tasks = alive_tasks();

    // 60 intermediates, every one a candidate issuer of every other: refused well within a
    // CPU bound, by zmesh's chain-length cap before any path building.
    let chain = hostile_chain(&id("client"), 60);
    let start = Instant::now();
    let seen = probe(u.hb, tls13_h2(Some(chain)), &target).await;
    let took = start.elapsed();
    eprintln!("60-intermediate chain refused after {took:?}");
    assert_eq!(seen, Seen::Alert(AlertDescription::CertificateUnknown));
    assert!(
        took < Duration::from_secs(1),
        "a 60-intermediate chain took {took:?}"
    );
    u.assert_rejected("tls_handshake", 1, "60 intermediate certificates")
        .await;
    assert_recovered(&u, tasks, "long chain").await;

    // A valid ClientHello (and the rest of the client's flight, and the HTTP/2 preface) one
    // byte per TCP segment: the handshake completes and a CONNECT is answered 200 and dialed.
    let dialed = u.dials();
    let (cert, mgr) = cert_from(&u.mesh.ca_dir, &id("client"));
    let cfg = zmesh::tls::client_config(&cert, &mgr.trust(), vec![id("server")]).unwrap();
    let tls = TlsConnector::from(Arc::new(cfg))
        .connect(
            zmesh::tls::placeholder_server_name(),
            dribble(u.hb, Duration::ZERO).await,
        )
        .await
        .expect("a dribbled handshake completes");
    let (mut send, conn) = h2::client::handshake(tls).await.unwrap();
    let driver = tokio::spawn(conn);
    assert_eq!(
        status(&mut send, connect_req(&target)).await,
        Ok(StatusCode::OK)
    );
    wait_until(
        "the dribbled CONNECT's dial",
        Duration::from_secs(5),
        || u.dials() == dialed + 1,
    )
    .await;
    drop(send);
    driver.abort();
    let _ = driver.await;
    assert_recovered(&u, tasks, "dribbled handshake").await;

    // The same, 20 ms a byte: the handshake cannot finish within the deadline, and the node
    // closes the connection at the deadline (not before, not much after).
    let timeouts = u.rejected("handshake_timeout");
    let start = Instant::now();
    let seen = probe_over(
        dribble(u.hb, Duration::from_millis(20)).await,
        tls13_h2(Some(valid_cert(&u.mesh, "client"))),
        &target,
    )
    .await;
    let took = start.elapsed();
    assert!(
        matches!(seen, Seen::Io(_) | Seen::Eof),
        "a handshake slower than the deadline ended as {seen:?}"
    );
    assert!(
        took >= DEADLINE - Duration::from_millis(100) && took < DEADLINE + Duration::from_secs(3),
        "closed after {took:?}, deadline {DEADLINE:?}"
    );
    wait_until("the timeout to be counted", Duration::from_secs(5), || {
        u.rejected("handshake_timeout") == timeouts + 1
    })
    .await;
    assert_recovered(&u, tasks, "slow dribble").await;

    // close_notify right after the ClientHello: the node closes the connection at once.
    let mut tcp = TcpStream::connect(u.hb).await.unwrap();
    tcp.write_all(&client_hello(&u.mesh)).await.unwrap();
    tcp.write_all(&[21, 3, 3, 0, 2, 1, 0]).await.unwrap(); // alert: warning, close_notify
    let (took, how) = until_closed(&mut tcp, Duration::from_secs(10)).await;
    assert!(
        took < DEADLINE,
        "close_notify mid-handshake: closed after {took:?} ({how})"
    );
    u.assert_rejected("tls_handshake", 2, "received fatal alert: CloseNotify")
        .await;
    drop(tcp);
    assert_recovered(&u, tasks, "close_notify").await;

    // Garbage instead of a ClientHello: closed at once.
    let mut tcp = TcpStream::connect(u.hb).await.unwrap();
    let mut garbage: Vec<u8> = (0..1024).map(|_| rand::random::<u8>()).collect();
    garbage[0] = 0xde; // no TLS content type, so the reason below is always the same

    let _ = tcp.write_all(&garbage).await;
    let start = Instant::now();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got)).await;
    let took = start.elapsed();
    assert!(took < DEADLINE, "garbage: closed after {took:?}");
    u.assert_rejected(
        "tls_handshake",
        3,
        "corrupt message of type InvalidContentType",
    )
    .await;
    drop(tcp);
    assert_recovered(&u, tasks, "garbage").await;
}
